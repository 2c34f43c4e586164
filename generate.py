"""Interactive inference: streaming REPL, one-shot (--instruction) or Gradio (--ui). See the README."""

import sys

from peft_bayes.cli.common import run_cli
from peft_bayes.cli.generate import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
