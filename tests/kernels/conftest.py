"""Where the kernel tests run: compiled on the GPU when CUDA is present, in Triton's interpreter on CPU otherwise
(tests/conftest.py sets ``TRITON_INTERPRET=1`` before triton's import on a machine without CUDA). The tests are the
same and so are their tolerances; only the device differs.

- ``kernel_device``: the device the fused kernels run on (``peft_bayes.kernels.sampled_lora.kernel_device``), the one
  every test module here builds its tensors on;
- tests marked ``triton`` are skipped, with the reason, where no Triton runtime exists (no triton, or no GPU and no
  interpreter);
- on a machine with CUDA every test here fails at once if triton was imported in interpreter mode: a GPU check must
  measure the compiled kernels, not the interpreter on CPU copies.
"""

from __future__ import annotations

import pytest
import torch

from peft_bayes.kernels.sampled_lora import kernel_device as _kernel_device
from peft_bayes.kernels.sampled_lora import triton_runtime

NO_RUNTIME = "the fused path needs triton on a GPU or triton's interpreter (TRITON_INTERPRET=1 before import)"


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the fused Triton kernels (compiled on CUDA, else interpreted)")


def pytest_collection_modifyitems(config, items):
    if triton_runtime() is not None:
        return
    skip = pytest.mark.skip(reason=NO_RUNTIME)
    for item in items:
        if item.get_closest_marker("triton") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    return _kernel_device()


@pytest.fixture(autouse=True)
def _compiled_where_cuda_is(request):
    if request.node.get_closest_marker("triton") is None or not torch.cuda.is_available():
        return
    if triton_runtime() != "compiled":
        pytest.fail("CUDA is present but triton runs in interpreter mode: unset TRITON_INTERPRET for GPU runs")
