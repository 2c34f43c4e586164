"""End-to-end smoke run of bench/real_model_calibration.py on a tiny local model and a tiny synthetic commonsense set
in LLM-Adapters' format (``Answer1: ... Answer format: answer1/...``): every method's row is in the table with finite
numbers, the JSON holds the exact commands, and a failing subprocess ends the bench with one line on stderr while the
earlier result files stay as they were. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "real_model_calibration.py"
TASK = "ARC-Easy"
ROW_LABELS = ["zero-shot (base model)", "LoRA (MAP)", "BayesLoRA (N=2)", "BayesLoRA (N=0, mean)"]
COLUMNS = ["ACC %", "ECE %", "NLL", "Brier", "mean confidence", "TV to MAP", "OOD AUROC", "eval examples/s",
           "evaluate s", "peak memory / MAP", "train minutes", "stored / MAP"]  # fmt: skip
HEADER = "| method | " + " | ".join(COLUMNS) + " |"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _bench_module():
    spec = importlib.util.spec_from_file_location("real_model_calibration", SCRIPT)
    if spec.name not in sys.modules:  # dataclasses look their module up there
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def _report_module():
    _bench_module()  # puts bench/ on sys.path for its siblings
    import real_model_report

    return real_model_report


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from peft_bayes.data.synthetic import write_choice_data
    from peft_bayes.tiny import build_tokenizer, save_tiny_model

    root = tmp_path_factory.mktemp("real_bench")
    write_choice_data(str(root / "data" / TASK), 4, 3, seed=0, n_options=4)
    model = save_tiny_model(
        root / "model", "llama", tokenizer=build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, seed=0
    )
    return root, model


def _flags(root: Path, model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--base_model",
        model,
        "--data_dir",
        str(root / "data"),
        "--task",
        TASK,
        "--n_train",
        "2",
        "--n_test",
        "3",
        "--max_steps",
        "1",
        "--samples",
        "2",
        "--batch_size",
        "2",
        "--micro_batch_size",
        "2",
        "--prompt_template",
        "alpaca_short",
        "--threads",
        "1",
        "--output_dir",
        str(out),
        "--work_dir",
        str(out / "work"),
        *extra,
    ]


def _run(root: Path, model: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *_flags(root, model, out, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_bench_runs_every_method_and_writes_table_json_and_figures(tiny_setup):
    root, model = tiny_setup
    out = root / "out"
    proc = _run(root, model, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = out / f"real_model_calibration_{TASK}"

    lines = stem.with_suffix(".md").read_text().splitlines()
    table = lines[lines.index(HEADER) + 2 :]
    table, conclusion = table[: table.index("")], table[table.index("") + 1 :]
    assert [row.split(" | ")[0].lstrip("| ") for row in table] == ROW_LABELS
    assert conclusion[0].startswith("MAP LoRA: ECE ") and "lowest ECE: BayesLoRA" in conclusion[0]
    for row in table:
        cells = dict(zip(COLUMNS, (c.strip() for c in row.strip("| ").split(" | ")[1:])))
        assert cells["OOD AUROC"] == "–"  # no --ood_task
        numbers = ["ACC %", "ECE %", "NLL", "Brier", "eval examples/s", "evaluate s"]
        if not row.startswith("| zero-shot"):
            numbers += ["train minutes", "stored / MAP", "peak memory / MAP"]
        else:
            assert cells["train minutes"] == cells["stored / MAP"] == "–"  # nothing trained, nothing stored
        assert all(math.isfinite(float(cells[c])) for c in numbers), row
        if row.startswith("| LoRA"):
            assert float(cells["stored / MAP"]) == float(cells["peak memory / MAP"]) == 1.0
        if row.startswith("| BayesLoRA"):
            assert float(cells["stored / MAP"]) > 1.0  # rho beside the means
    assert HEADER in proc.stdout and all(f"| {label} |" in proc.stdout for label in ROW_LABELS)
    assert re.search(r"\[\s*\d+\.\d min\] \(6/6\) seed 0: evaluate bayeslora:mean: done", proc.stdout)
    assert re.search(r"\(1/6\) seed 0: .*: done in \d+\.\d min; about \d+ min left \(5 steps\)", proc.stdout)

    data = json.loads(stem.with_suffix(".json").read_text())
    commands = data["commands"]
    assert [c.split()[1] for c in commands] == [
        "evaluate.py",
        "train.py",
        "evaluate.py",
        "train.py",
        "evaluate.py",
        "evaluate.py",
    ]
    assert "--adapter_name bayeslora" in commands[3] and "--choice_format cloze" in commands[3]
    assert "--samples 2" in commands[4] and "--samples 0" in commands[5]
    by_row = {r["row"]: r for r in data["results"]}
    assert (
        by_row["bayeslora:samples"]["summary"]["samples"] == 2 and by_row["bayeslora:mean"]["summary"]["samples"] == 0
    )
    assert by_row["lora"]["train_command"] == commands[1] and by_row["zero-shot"]["train_command"] is None
    assert len(data["train_indices"]) == 2 and data["settings"]["seeds"] == [0]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"]
    for result in data["results"]:
        assert Path(result["reliability_png"]).is_file(), result["row"]
    assert (out / f"real_model_calibration_{TASK}_reliability.png").is_file()


def test_failing_subprocess_gives_one_line_error_and_keeps_earlier_results(tiny_setup, tmp_path, capsys):
    root, _ = tiny_setup
    earlier = tmp_path / f"real_model_calibration_{TASK}.md"
    earlier.write_text("earlier result\n")
    flags = _flags(root, str(tmp_path / "no-such-model"), tmp_path, "--methods", "zero-shot")
    assert _bench_module().main(flags) == 1
    err = capsys.readouterr().err
    # one line says what failed; the subprocess's own output is in its log, not on the bench's stderr
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: seed 0: evaluate zero-shot: evaluate.py exited with status 2 (error: ")
    assert "no-such-model" in err and Path(err.strip().split("full log: ")[1]).is_file()
    assert earlier.read_text() == "earlier result\n"


def test_methods_select_variants_and_reject_unknown_names(capsys):
    bench = _bench_module()
    args = bench.parse_args(["--methods", "lora,bayeslora:mean", "--seeds", "0,1"])
    assert [v.key for _, v in args.rows] == ["lora", "bayeslora:mean"] and args.seeds == [0, 1]
    assert bench.count_steps(args) == 2 * (2 + 2)  # per seed: two trainings, two evaluations
    args = bench.parse_args(["--methods", "zero-shot,bayeslora", "--seeds", "0,1,2"])
    assert bench.count_steps(args) == 1 + 3 * (1 + 2)  # zero-shot once: it does not depend on the seed
    for bad in ("nope", "bayeslora:nope"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--methods", bad])
        assert "--methods" in capsys.readouterr().err


def test_table_reports_mean_and_std_over_seeds():
    bench = _bench_module()
    args = bench.parse_args(["--methods", "lora"])
    summaries = [
        {
            "accuracy_percent": a,
            "ece_percent": 10.0,
            "nll_nats": 1.0,
            "brier_sum_over_classes": 0.5,
            "examples_per_s": 3.0,
        }
        for a in (40.0, 50.0)
    ]
    results = [{"row": "lora", "train_seconds": 120.0, "summary": s} for s in summaries]
    report = _report_module()
    (row,) = report.aggregate(args, results)
    assert row["ACC %"]["mean"] == 45.0 and math.isclose(row["ACC %"]["std"], math.sqrt(50.0))
    assert row["train minutes"] == {"mean": 2.0, "std": 0.0}
    assert "| LoRA (MAP) | 45.00 ± 7.07 | 10.00 ± 0.00 |" in report.markdown([row])


def test_every_posterior_joins_one_table_with_ood_auroc_and_stored_state(tiny_setup):
    """temperature, MC dropout, ensemble, SWAG, MultiSWAG, TFB and Laplace on the same tiny run, with --ood_task:
    each row has finite metrics and an OOD AUROC, ensembles train their members with seeds s + 1000 i, and the
    stored-state column counts what each method keeps (M adapters for an ensemble)."""
    root, model = tiny_setup
    out = root / "out-all"
    methods = "lora,temperature,mc_dropout,ensemble,swag,multiswag,tfb,laplace:all,laplace:val"
    flags = ["--methods", methods, "--ood_task", TASK, "--ensemble_size", "2", "--lora_dropout", "0.1", "--n_val", "1"]
    flags += ["--tfb_anchor", "2", "--swag_start", "0steps", "--max_steps", "2", "--n_train", "3"]
    proc = _run(root, model, out, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    data = json.loads((out / f"real_model_calibration_{TASK}.json").read_text())
    rows = {r["row"]: r for r in data["table"]}
    assert list(rows) == [
        *("lora", "temperature", "mc_dropout", "ensemble", "swag", "multiswag", "tfb", "laplace:all", "laplace:val")
    ]
    for key, row in rows.items():
        for column in ("ACC %", "ECE %", "NLL", "Brier", "OOD AUROC", "stored / MAP", "peak memory / MAP"):
            assert row[column] is not None and math.isfinite(row[column]["mean"]), (key, column)
    assert rows["lora"]["stored / MAP"]["mean"] == 1.0
    assert rows["ensemble"]["stored / MAP"]["mean"] == pytest.approx(2.0, rel=1e-2)  # two same-shaped adapters
    assert rows["temperature"]["stored / MAP"]["mean"] > 1.0 and rows["swag"]["stored / MAP"]["mean"] > 2.0
    commands = data["commands"]
    trains = [c for c in commands if c.split()[1] == "train.py"]
    assert len(trains) == 4  # lora, lora member 1, swag, swag member 1
    assert sum("--seed 1000" in c for c in trains) == 2 and sum("--posterior swag" in c for c in trains) == 2
    by_row = {r["row"]: r for r in data["results"]}
    assert "--members" in by_row["ensemble"]["eval_command"] and "train-lora-m1" in by_row["ensemble"]["eval_command"]
    assert "train-swag-m1" in by_row["multiswag"]["eval_command"]
    assert by_row["multiswag"]["summary"]["samples"] == 2  # --samples 2 rounded to a multiple of the 2 members
    assert by_row["temperature"]["summary"]["temperature"]["n_data"] == 1
    val_slice = by_row["temperature"]["eval_command"].split("--fit_data_path ")[1].split()[0]
    assert f"--prior_method val --val_data_path {val_slice}" in by_row["laplace:val"]["eval_command"]
    assert by_row["laplace:val"]["summary"]["laplace"]["prior_method"] == "val"
    _check_diagnostics(rows, by_row)
    _check_resume(root, model, out, flags)


def _check_diagnostics(rows: dict, by_row: dict) -> None:
    """The two diagnostic columns recomputed from evaluate.py's predictions on disk with numpy: the mean of the
    largest option probability, and the mean total variation between a row's predictive and the MAP's."""

    def probs(key: str) -> list[np.ndarray]:
        path = Path(by_row[key]["eval_dir"]) / f"{TASK}_predictions.json"
        return [np.asarray(p["probs"], dtype=np.float64) for p in json.loads(path.read_text())]

    reference = probs("lora")
    for key, row in rows.items():
        mine = probs(key)
        assert row["mean confidence"]["mean"] == pytest.approx(np.mean([p.max() for p in mine]), rel=1e-12), key
        tv = np.mean([np.abs(p - q).sum() / 2 for p, q in zip(mine, reference)])
        assert row["TV to MAP"]["mean"] == pytest.approx(tv, rel=1e-12, abs=1e-15), key
    assert rows["lora"]["TV to MAP"]["mean"] == 0.0
    assert rows["temperature"]["TV to MAP"]["mean"] > 1e-3  # one temperature != 1 moves every question


def _check_resume(root: Path, model: str, out: Path, flags: list[str]) -> None:
    """--resume reruns only what is missing: an evaluation whose folder is gone (reusing the adapters it needs, the
    ensemble members too), and nothing once the adapters are gone but every evaluation is kept (a work folder saved
    without its adapters, as bench/results/papers is, resumes in a later session)."""
    commands = lambda: json.loads((out / f"real_model_calibration_{TASK}.json").read_text())["commands"]  # noqa: E731
    shutil.rmtree(out / "work" / "seed0" / "eval-ensemble")
    again = _run(root, model, out, *flags, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(train-lora-m1) (reused" in again.stdout and "(train-swag-m1) not needed" in again.stdout
    assert [c.split()[1] for c in commands()] == ["evaluate.py"] and "--members" in commands()[0]
    for adapter in (out / "work" / "seed0").glob("train-*"):
        shutil.rmtree(adapter)
    final = _run(root, model, out, *flags, "--resume")
    assert final.returncode == 0 and commands() == [], final.stderr[-3000:]
    assert "(train-lora-m1) not needed" in final.stdout


def test_letter_format_both_optimizers_sigma_figure_and_validation_split(tiny_setup):
    """--choice_format letter with both BayesLoRA optimizers, scored on the validation slice: the sigma figure and
    trajectories, the one-line conclusion, and a later --resume run of other rows keeping the earlier ones."""
    root, model = tiny_setup
    out = root / "out-letter"
    common = ("--choice_format", "letter", "--split", "val", "--n_val", "2", "--tag", "t", "--max_steps", "5")
    proc = _run(root, model, out, *common, "--methods", "lora,bayeslora,bayeslora_single")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    stem = out / f"real_model_calibration_{TASK}_t_val"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [r["row"] for r in data["table"]][:2] == ["lora", "bayeslora:samples"]
    assert "validation" in stem.with_suffix(".md").read_text().splitlines()[0]
    trains = [c for c in data["commands"] if c.split()[1] == "train.py"]
    assert sum("--bayes_optimizer blob" in c for c in trains) == 1
    assert sum("--bayes_optimizer single" in c for c in trains) == 1
    assert all("--choice_format letter" in c for c in data["commands"])
    assert all("--data_path" in c and "_val_" in c for c in data["commands"] if c.split()[1] == "evaluate.py")
    assert sorted(t["optimizer"] for t in data["sigma_trajectories"]) == ["blob", "single"]
    assert all(t["trajectory"] and "sigma_mean" in t["trajectory"][0] for t in data["sigma_trajectories"])
    assert Path(data["sigma_figure"]).is_file()
    assert proc.stdout.strip().splitlines()[-1] == data["conclusion"] and data["conclusion"].startswith("MAP LoRA")
    # a later run of another row keeps the earlier rows' records for the next --resume
    again = _run(root, model, out, *common, "--methods", "zero-shot", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    progress = json.loads((out / "work" / "progress.json").read_text())
    assert {"zero-shot", "lora", "bayeslora:samples"} <= {r.get("row") for r in progress}
    final = _run(root, model, out, *common, "--methods", "zero-shot,lora,bayeslora", "--resume")
    assert json.loads(stem.with_suffix(".json").read_text())["commands"] == [] and final.returncode == 0


def test_missing_data_sets_exit_2_with_one_line_naming_data_dir(tmp_path, capsys):
    """`make demo-real` without ../shared/data: bad input (exit 2, as every script), said in one line."""
    missing = tmp_path / "no-data"
    flags = ["--data_dir", str(missing), "--output_dir", str(tmp_path / "out"), "--methods", "zero-shot"]
    assert _bench_module().main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --data_dir/--task:")
    assert str(missing / "ARC-Easy" / "test.json") in err and "pass --data_dir" in err
    assert not (tmp_path / "out").exists()


def test_conclusion_sets_each_sampled_bayesian_row_against_the_map():
    report = _report_module()

    def row(key, label, ece, acc):
        return {"row": key, "label": label, "ECE %": {"mean": ece, "std": 1.0}, "ACC %": {"mean": acc, "std": 0.0}}

    rows = [
        row("lora", "LoRA (MAP)", 32.0, 54.0),
        row("temperature", "temperature scaling (MAP)", 14.0, 54.0),
        row("bayeslora:samples", "BayesLoRA (N=10)", 33.6, 54.0),
        row("bayeslora:mean", "BayesLoRA (mean)", 33.6, 54.0),
        row("bayeslora_single:samples", "BayesLoRA, one AdamW (N=10)", 8.0, 50.0),
    ]
    line = report.conclusion(rows)
    assert "lowest ECE: BayesLoRA, one AdamW (N=10) 8.0 % (0.25 x the MAP's) at 50.0 % accuracy" in line
    assert line.endswith(
        "; temperature scaling 14.0 % at 54.0 %; BayesLoRA (N=10) 33.6 % (1.05 x the MAP's) at 54.0 %"
    )
