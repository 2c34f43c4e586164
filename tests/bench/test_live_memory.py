"""bench/live_memory.py's LivePeak against allocations whose sizes are known: new storages count, frees are
subtracted, storages from before the block and views of them do not count, and the backward's operations are seen."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from live_memory import LivePeak  # noqa: E402


def test_peak_of_known_allocations():
    before = torch.zeros(1000)
    with LivePeak() as peak:
        a = torch.ones(1000)  # 4,000 bytes live
        b = a * 2  # 8,000
        del a  # 4,000
        c = torch.empty(3000, dtype=torch.float64)  # 28,000: the peak
        view = before.view(10, 100)  # an old storage: not counted
        view.add_(1)  # in place on it: nothing new
        del b, c
        d = torch.ones(10)  # 40 bytes left at the end
    assert peak.bytes == 28_000 and peak.current == 40
    del d


def test_backward_allocations_are_seen():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(16, 32)
    with LivePeak() as peak:
        (x @ w.t()).sum().backward()
    # forward: the 64 x 16 product and its sum; backward: the expanded ones and the 64 x 32 gradient of x
    assert peak.bytes >= 64 * 32 * 4 and peak.current >= 64 * 32 * 4  # x.grad stays alive
    assert x.grad is not None
