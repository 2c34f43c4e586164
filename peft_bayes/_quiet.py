"""Known third-party messages that say nothing a user of this library can act on, filtered at their source.

Each filter names the message, where it comes from and why it is safe to drop; anything else still shows.
"""

from __future__ import annotations

import logging
import warnings

# bitsandbytes (backends/cpu/ops.py, seen with 0.50) logs this at import on a CPU with AVX512-BF16 when the optional
# Hub package `kernels` is missing: it would only speed up the repacked 4-bit *inference* kernel, which this library
# turns off for every 4-bit model it loads (peft_bayes.models.disable_bnb_cpu_repacking: that kernel has no
# backward). The first line of every run was this message.
BNB_CPU_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community"
# PEFT's get_peft_model reads `model.is_gradient_checkpointing` (peft_model.py), which transformers 5.x deprecated
# with a FutureWarning on every read; the caller is PEFT, not the user, and the value is still right.
GRADIENT_CHECKPOINTING_RENAME = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Installs the filters (idempotent): a logging filter on bitsandbytes' CPU backend logger (set up before
    bitsandbytes is imported, so it catches the import-time message) and a warnings filter."""
    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropMessage(BNB_CPU_KERNEL))
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_RENAME, category=FutureWarning)
