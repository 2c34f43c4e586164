"""peak_memory(): the peak resident memory of the process itself, not of the process that started it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from peft_bayes.io import peak_memory

CHILD = """
import json
from peft_bayes.io import peak_memory
block = bytearray({mib} * 2**20)
block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not only reserved
del block
print(json.dumps(peak_memory()))
"""


def _child_peak(mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD.format(mib=mib)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_counts_the_process_own_pages_and_stays_after_they_are_freed():
    # This test process (torch loaded) is larger than either child: ru_maxrss would report its size for both.
    idle, busy = _child_peak(0), _child_peak(300)
    assert idle < peak_memory()["peak_rss_bytes"]
    assert 280 * 2**20 < busy - idle < 400 * 2**20, (idle, busy)
