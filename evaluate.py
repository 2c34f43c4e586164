"""Evaluate a base model or an adapter on a test set. See `python evaluate.py --help` and the README."""

import sys

from peft_bayes.cli.common import run_cli
from peft_bayes.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
