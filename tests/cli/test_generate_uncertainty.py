"""generate.py --posterior: each answer's uncertainty in the terminal (plain markers, colour in a pty) and as JSON."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from peft_bayes.cli import generate as gen
from peft_bayes.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"
SWAG = ["--posterior", "swag", "--swag_start", "0steps", "--swag_collect_every", "1"]


@pytest.fixture(scope="module")
def swag_adapter(llama_dir, data_file, train_argv, tmp_path_factory):
    from peft_bayes.cli import train

    out = tmp_path_factory.mktemp("gen-swag") / "adapter"
    assert train.main(train_argv(llama_dir, data_file, out, "--max_steps", "3", "--learning_rate", "2e-2", *SWAG)) == 0
    return str(out)


def _flags(llama_dir, adapter, *extra) -> list[str]:
    return ["--base_model", str(llama_dir), "--adapter", adapter, "--instruction", QUESTION, "--temperature", "0",
            "--max_new_tokens", "6", *extra]  # fmt: skip


def test_plain_output_has_summary_markers_and_votes(llama_dir, swag_adapter, capsys):
    assert gen.main(_flags(llama_dir, swag_adapter, "--posterior", "swag", "--samples", "3", "--no_color")) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = next(line for line in lines if line.startswith("-- "))
    assert summary.split(" · ")[0].split()[-1] in {"confident", "uncertain"}
    assert "3 draws" in summary and "epistemic" in summary and "agreement" in summary
    marked = next(line for line in lines if "most uncertain tokens:" in line)
    assert 1 <= marked.count("[[") == marked.count("]]") <= 3 and "\x1b[" not in marked
    assert any(line.strip().startswith("3 sampled answers:") for line in lines)


def test_json_has_every_number(llama_dir, swag_adapter, capsys):
    assert gen.main(_flags(llama_dir, swag_adapter, "--posterior", "swag", "--samples", "3", "--json")) == 0
    record = json.loads(capsys.readouterr().out)
    u = record["uncertainty"]
    assert record["response"].strip() == u["answer"].strip() and u["draws"] == 3 and len(u["samples"]) == 3
    n = len(u["token_ids"])
    assert n >= 1 and len(u["tokens"]) == n
    for key in ("bma_prob", "predictive_entropy", "expected_entropy", "mutual_information"):
        assert len(u["per_token"][key]) == n
    for key in ("predictive_entropy", "expected_entropy", "mutual_information", "log_prob"):
        assert key in u["totals"] and key in u["means"]
    assert u["extra"] == {"batched_draws": True, "posterior": "swag"}
    assert sum(g["votes"] for g in u["agreement"]["groups"]) == 3 and u["verdict"] in {"confident", "uncertain"}
    assert u["totals"]["mutual_information"] > 0  # SWAG's draws disagree somewhere


def test_point_estimate_reports_no_epistemic_part(llama_dir, swag_adapter, capsys):
    assert gen.main(_flags(llama_dir, swag_adapter, "--posterior", "map", "--json")) == 0
    u = json.loads(capsys.readouterr().out)["uncertainty"]
    assert u["draws"] == 1 and u["agreement"] is None and u["samples"] == []
    assert set(u["per_token"]["mutual_information"]) == {0.0}
    assert u["per_token"]["expected_entropy"] == pytest.approx(u["per_token"]["predictive_entropy"], rel=1e-12)


def test_without_posterior_flags_the_output_is_the_answer_alone(llama_dir, swag_adapter, capsys):
    assert gen.main(_flags(llama_dir, swag_adapter)) == 0
    assert "-- " not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--posterior", "swag", "--samples", "-1"], "--samples must be 0"),
        (["--posterior", "swag", "--mark_top", "-2"], "--mark_top"),
        (["--posterior", "nope"], "invalid choice"),
    ],
)
def test_bad_uncertainty_flags(llama_dir, swag_adapter, flags, message, capsys):
    with pytest.raises((InputError, SystemExit)) as err:
        gen.main(_flags(llama_dir, swag_adapter, *flags))
    assert message in (str(err.value) + capsys.readouterr().err)


def _run_in_pty(argv: list[str], env: dict) -> str:
    """The script's output as a terminal shows it (stdout is a pty)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), *argv], stdout=follower, stderr=follower,
                            stdin=subprocess.DEVNULL, cwd=ROOT, env=env)  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0, b"".join(chunks)[-2000:]
    os.close(leader)
    return b"".join(chunks).decode("utf-8", errors="replace")


def test_terminal_colours_the_uncertain_tokens_and_no_color_env_turns_it_off(llama_dir, swag_adapter):
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    argv = _flags(llama_dir, swag_adapter, "--posterior", "swag", "--samples", "2")
    coloured = _run_in_pty(argv, env)
    line = next(x for x in coloured.splitlines() if "most uncertain tokens:" in x)
    assert gen.RED in line and "[[" not in line
    assert gen.YELLOW in coloured or gen.DIM in coloured  # the summary line's colour
    plain = _run_in_pty(argv, {**env, "NO_COLOR": "1"})
    line = next(x for x in plain.splitlines() if "most uncertain tokens:" in x)
    assert "\x1b[" not in line and "[[" in line
