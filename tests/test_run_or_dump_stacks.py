"""The multi-process tests' runner (``run_or_dump_stacks`` in conftest.py) cannot hang: a worker that torchrun left
behind in a session of its own, still holding the output pipes, is found by its environment and killed on the
timeout, and the test fails naming the hang instead of waiting for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

ORPHAN = """
import subprocess, sys
# a child in a new session that keeps our stdout / stderr open and outlives us, as a stuck torchrun worker does
subprocess.Popen([sys.executable, "-c", "import time; print('worker up', flush=True); time.sleep(600)"],
                 start_new_session=True)
print("launcher done", flush=True)
"""


def test_a_worker_left_holding_the_pipes_is_killed_on_the_timeout(run_or_dump_stacks):
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="hung for 5 s") as failure:
        run_or_dump_stacks([sys.executable, "-c", ORPHAN], dict(os.environ), timeout=5)
    assert time.monotonic() - t0 < 60
    assert "launcher done" in str(failure.value) and "worker up" in str(failure.value)
    leftover = subprocess.run(["pgrep", "-f", "worker up"], capture_output=True, text=True).stdout.split()
    assert not leftover, leftover
