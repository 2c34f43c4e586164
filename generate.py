"""Interactive inference: streaming REPL, one-shot (--instruction) or Gradio (--ui). See the README."""

import logging
import sys

# bitsandbytes logs, on import on AVX512-BF16 CPUs, that it cannot fetch a CPU kernel from the Hub; peft_bayes never
# uses that kernel (peft_bayes.cli.modeling.disable_bnb_cpu_repacking), so the line would only bury our own errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from peft_bayes.cli.common import run_cli  # noqa: E402
from peft_bayes.cli.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
