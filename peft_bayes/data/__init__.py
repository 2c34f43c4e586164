"""Prompt templates, dataset loading, tokenization and answer extraction."""

from peft_bayes.data.loading import load_records, split_train_val, tokenize_letter_record, tokenize_record
from peft_bayes.data.prompts import ChatPrompter, Prompter, available_templates

__all__ = [
    "ChatPrompter",
    "Prompter",
    "available_templates",
    "load_records",
    "split_train_val",
    "tokenize_letter_record",
    "tokenize_record",
]
