"""What every benchmark writes beside its numbers: the machine it ran on, and its results as JSON (settings,
machine, runs) plus a markdown table that ends with the command that produced it. Imported by the scripts in
this folder (their own folder is on ``sys.path`` when they run)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

from peft_bayes.io import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def machine_info() -> dict:
    """Python, platform, CPUs (usable ones and the load average at the start), torch threads, the versions of
    torch / transformers / peft, the CUDA device and the git commit."""
    import peft
    import torch
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["git_commit"] = git.stdout.strip() or None
    return info


def write_results(output_dir: str, stem: str, settings: dict, runs: list[dict], text: str) -> Path:
    """Writes ``<stem>.json`` ({settings, machine, runs}) and ``<stem>.md`` (``text`` and the command line) under
    ``output_dir`` (created), each atomically; returns the markdown's path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", {"settings": settings, "machine": machine_info(), "runs": runs})
    command = "python " + " ".join(sys.argv)
    write_text_atomic(out / f"{stem}.md", f"{text}\n\nCommand: `{command}`\n")
    return out / f"{stem}.md"
