"""Bad input gets a one-line error naming the problem, a non-zero exit, and leaves --output_dir untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_bayes.cli.common import run_cli
from peft_bayes.cli.evaluate import main as eval_main
from peft_bayes.cli.train import main as train_main

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def existing_output(tmp_path):
    """An output_dir holding an earlier run's results, which a failed run must not touch."""
    out = tmp_path / "earlier_run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"earlier weights")
    (out / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (out / "checkpoint-200").mkdir()
    (out / "checkpoint-200" / "trainer_state.json").write_text("{}")
    return out


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "malformed": '[{"instruction": "a", "output": "b"},',
        "missing_field": '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]',
        "empty": "[]",
        "not_a_list": '{"instruction": "a"}',
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(text)
    return paths


CASES = {
    # case: (argv changes, text the one-line message must contain)
    "malformed": (["--data_path", "{malformed}"], "malformed JSON"),
    "missing_field": (["--data_path", "{missing_field}"], "record 1 lacks the field(s) output"),
    "empty": (["--data_path", "{empty}"], "the dataset is empty"),
    "not_a_list": (["--data_path", "{not_a_list}"], "expected a JSON list"),
    "missing_data_file": (["--data_path", "{tmp}/nope.json"], "no such data file"),
    "unknown_adapter": (["--adapter_name", "lorax"], "unknown --adapter_name 'lorax'"),
    "targets_match_nothing": (["--target_modules", "foo_proj,bar"], "match no module"),
    "missing_base_model": (["--base_model", "{tmp}/no_such_model"], "base model"),
    "micro_batch_not_dividing": (["--batch_size", "10", "--micro_batch_size", "4"], "does not divide --batch_size"),
    "resume_missing": (["--resume_from_checkpoint", "{tmp}/nowhere"], "--resume_from_checkpoint"),
    "bad_template": (["--prompt_template", "nonesuch"], "unknown prompt template"),
    "val_too_large": (["--val_set_size", "100"], "leaves no training data"),
    "adapterp_flag_on_lora": (["--use_adapterp", "true"], "--use_adapterp applies to --adapter_name bottleneck only"),
    "adapterp_and_parallel": (
        ["--adapter_name", "bottleneck", "--use_adapterp", "true", "--use_parallel_adapter", "true"],
        "--use_parallel_adapter and --use_adapterp exclude each other",
    ),
    "parallel_flag_on_adapterh": (
        ["--adapter_name", "adapterh", "--use_parallel_adapter", "true"],
        "--use_parallel_adapter applies to --adapter_name bottleneck only",
    ),
    "lokr_on_8bit": (["--adapter_name", "LoKr", "--load_8bit", "true"], "LoKr does not support a quantized base"),
    "loha_on_4bit": (["--adapter_name", "loha", "--load_4bit", "true"], "loha does not support a quantized base"),
    "prefix_with_checkpointing": (
        ["--adapter_name", "prefix-tuning", "--use_gradient_checkpointing", "true"],
        "cannot be combined with --use_gradient_checkpointing",
    ),
}


def _error_line(stderr: str) -> str:
    """The one error line, on a line of its own (progress bars also write to stderr, before or after it)."""
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


def _override(argv: list[str], changes: list[str]) -> list[str]:
    argv = list(argv)
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_rejects_bad_input(case, llama_dir, data_file, tmp_path, existing_output, train_argv, capsys):
    changes, expected = CASES[case]
    fmt = {k: str(v) for k, v in _bad_files(tmp_path).items()} | {"tmp": str(tmp_path)}
    argv = _override(train_argv(llama_dir, data_file, existing_output), [c.format(**fmt) for c in changes])
    before = _snapshot(existing_output)
    assert run_cli(train_main, argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert expected in err
    assert _snapshot(existing_output) == before


def test_train_subprocess_exit_code_and_single_line(tmp_path, llama_dir, data_file, train_argv, existing_output):
    argv = _override(train_argv(llama_dir, data_file, existing_output), ["--adapter_name", "nonsense"])
    proc = subprocess.run(
        [sys.executable, "train.py", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert _error_line(proc.stderr) == (
        "error: unknown --adapter_name 'nonsense'; expected one of: " + ", ".join(_adapter_names())
    )


def _adapter_names():
    from peft_bayes.tuners.catalogue import ADAPTERS

    return list(ADAPTERS)


def test_non_finite_loss_stops_training_and_keeps_output(
    llama_dir, data_file, tmp_path, existing_output, capsys, train_argv
):
    before = _snapshot(existing_output)
    argv = _override(
        train_argv(llama_dir, data_file, existing_output), ["--learning_rate", "1e30", "--max_steps", "6"]
    )
    assert run_cli(train_main, argv) == 2
    err = _error_line(capsys.readouterr().err)
    assert err.startswith("error: the training loss became") and "--learning_rate" in err
    after = _snapshot(existing_output)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier files untouched
    assert not (existing_output / "train_args.json").exists()  # no final adapter from a diverged run


@pytest.mark.parametrize(
    "changes,expected",
    [
        (["--adapter", "{tmp}"], "no adapter_config.json"),
        (["--dataset", "NoSuchSet", "--data_dir", "{tmp}"], "NoSuchSet"),
        (["--data_path", "{tmp}/nope.json"], "no such data file"),
        (["--batch_size", "0"], "must be positive"),
    ],
)
def test_evaluate_rejects_bad_input(changes, expected, llama_dir, data_file, tmp_path, capsys):
    argv = ["--base_model", str(llama_dir), "--data_path", data_file, "--output_dir", str(tmp_path / "ev")]
    argv = _override(argv, [c.format(tmp=tmp_path) for c in changes])
    if "--dataset" in changes:
        del argv[argv.index("--data_path") : argv.index("--data_path") + 2]
    assert run_cli(eval_main, argv) == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "ev").exists()


def test_evaluate_rejects_adapter_for_another_model(model_dirs, data_file, tmp_path, capsys, train_argv):
    adapter = tmp_path / "gpt2_adapter"
    assert train_main(train_argv(model_dirs["gpt2"], data_file, adapter)) == 0
    argv = ["--base_model", model_dirs["llama"], "--adapter", str(adapter), "--data_path", data_file]
    assert run_cli(eval_main, [*argv, "--output_dir", str(tmp_path / "ev")]) == 2
    assert _error_line(capsys.readouterr().err).startswith("error: --adapter")
    json.loads((adapter / "adapter_config.json").read_text())  # the adapter itself is untouched


@pytest.mark.parametrize("main", [train_main, eval_main])
def test_unknown_flag_is_one_line(main, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--base_model", "m", "--no_such_flag", "1"])
    assert exc.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: unrecognized arguments: --no_such_flag 1 (see "
        + ("train.py" if main is train_main else "evaluate.py")
        + " --help)\n"
    )


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--scaling", "lots"], "error: argument --scaling: scaling must be a number or 'learned', got 'lots'"),
        (["--non_linearity", "swish"], "error: argument --non_linearity: invalid choice 'swish'"),
        (["--adapter_init", "xavier"], "error: argument --adapter_init: invalid choice 'xavier'"),
    ],
)
def test_bad_adapter_flag_values_are_one_line(flags, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--base_model", "m", "--adapter_name", "parallel", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
