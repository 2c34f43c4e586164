"""Helpers shared by the three scripts: one-line errors, atomic writes, flag types."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable

from peft_bayes.errors import InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with LLM-Adapters-friendly help and a one-line error (no usage dump) for unknown or bad flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def str2bool(value: str | bool) -> bool:
    """Argparse type for LLM-Adapters-style boolean flags (``--train_on_inputs False``)."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise InputError(f"expected a boolean (true/false), got {value!r}")


def comma_list(value: str) -> list[str]:
    """``"q_proj,v_proj"`` or ``"[q_proj, v_proj]"`` (LLM-Adapters' fire syntax) → ``["q_proj", "v_proj"]``."""
    value = value.strip().strip("[]")
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip().strip("'\"")]


def positive_ints(text: str) -> list[int]:
    """Argparse type for ``"8,16,64"``: positive integers separated by commas."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def peak_memory() -> dict:
    """This process's peak memory so far, in bytes (None where unknown): ``peak_rss_bytes``, the resident high-water
    mark of this program's own address space (Linux ``VmHWM``; unlike ``ru_maxrss`` it does not start at the parent's
    size when the process was forked), and ``peak_cuda_bytes``, the CUDA allocator's peak where CUDA was used."""
    rss = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) * 1024  # kB
                    break
    except OSError:
        pass
    torch = sys.modules.get("torch")
    cuda = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = int(torch.cuda.max_memory_allocated())
    return {"peak_rss_bytes": rss, "peak_cuda_bytes": cuda}


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a temp file beside ``path`` and renames it over ``path``: readers never see half a file, and
    a failed write leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(str(path))[1])
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON atomically (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Runs a script's ``main``; bad input becomes ``error: <one line>`` on stderr and exit status 2."""
    try:
        return int(main(argv) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
