"""Fine-tune a causal LM with an adapter. See `python train.py --help` and the README."""

import sys

from peft_bayes.cli.common import run_cli
from peft_bayes.cli.train import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
