"""Files and process facts shared by the library, the scripts and the benches: atomic writes (a reader never sees
half a file or folder, and a failed write leaves the old one intact), JSON reading with one-line errors, the
process's peak memory, and progress lines. Imports nothing from peft_bayes but its errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from peft_bayes.errors import InputError


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


def write_folder_atomically(folder: str, write: Callable[[str], None], prefix: str = ".tmp-") -> str:
    """Runs ``write(tmp)`` on a new temporary folder beside ``folder``, then renames it into place (an earlier
    ``folder`` is replaced only once the new one is complete), so an interrupted write never leaves a broken or
    half-replaced folder. Returns ``folder``."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        write(tmp)
        if os.path.isdir(folder):
            old = folder + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_files_into(folder: str, write: Callable[[str], str | None], prefix: str = ".tmp-") -> str:
    """Runs ``write(tmp)`` on a temporary folder inside ``folder``, then moves each entry it wrote into ``folder``
    (``os.replace``: an entry of the same name is replaced, the others stay), so an interrupted write never leaves a
    half-written file there. ``write`` may return a subfolder of ``tmp`` to move the entries of instead (PEFT saves
    a named adapter in one). Returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=folder)
    try:
        source = write(tmp) or tmp
        for name in os.listdir(source):
            os.replace(os.path.join(source, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_json(path: str) -> Any:
    """The JSON in ``path``; a one-line error naming the file when it is not valid JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as err:
            raise InputError(f"{path}: not valid JSON ({err})") from None


def progress_printer(label: str, quiet: bool = False, stream=None) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback printing ``label: done/total`` to ``stream`` (stdout): redrawn in place on
    a terminal; elsewhere (a log file, a pipe) one plain line at each tenth of the way, so logs stay short."""
    state = {"shown": -1}

    def progress(done: int, total: int) -> None:
        out = stream or sys.stdout
        if quiet:
            return
        if out.isatty():
            print(f"\r{label}: {done}/{total}", end="" if done < total else "\n", file=out, flush=True)
            return
        tenth = 10 * done // max(total, 1)
        if tenth > state["shown"] or done >= total:
            if done >= total and state["shown"] == 10:
                return
            state["shown"] = 10 if done >= total else tenth
            print(f"{label}: {done}/{total}", file=out, flush=True)

    return progress
