"""Batched generation for evaluation: prompts sorted by token length, left-padded, generated with the KV cache."""

from __future__ import annotations

from peft_bayes.models import model_device


def make_batches(lengths: list[int], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Indices grouped into batches, longest first; ``same_length`` never mixes lengths (no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        if last is None or len(last) == batch_size or (same_length and lengths[last[0]] != lengths[i]):
            batches.append([i])
        else:
            last.append(i)
    return batches


def _pads_safely(model) -> bool:
    # PEFT drops position_ids for prompt tuning and p-tuning, so a left-padded prompt would sit at shifted
    # absolute positions: those adapters are batched only with prompts of the same token length.
    config = getattr(model, "active_peft_config", None)
    return not (getattr(config, "is_prompt_learning", False) and config.peft_type != "PREFIX_TUNING")


def generate_batched(
    model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, num_beams: int = 1, progress=None
) -> list[str]:
    """Greedy (or beam) continuations of ``prompts``, batched longest first; results in input order."""
    import torch

    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    batches = make_batches(lengths, batch_size, same_length=not _pads_safely(model))
    outputs: list[str] = [""] * len(prompts)
    device = model_device(model)
    done = 0
    for idx in batches:
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]  # left padding: every prompt ends at the same column
        for i, text in zip(idx, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text
        done += len(idx)
        if progress:
            progress(done, len(prompts))
    return outputs
