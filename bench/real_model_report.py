"""The report of ``bench/real_model_calibration.py``: the table (mean ± std over seeds, ratios to the MAP), its
conclusion line, the machine, the reliability diagrams and the sigma trajectories, written atomically."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from real_model_methods import ECE_BINS, STEM, STORED, Variant, _multiple_of, slug

from peft_bayes.io import write_json_atomic, write_text_atomic


def stored_bytes(method: str, adapter: Path | None, members: list[str]) -> int | None:
    """Bytes a method keeps beside the base model: its adapter(s) and the posterior state saved next to them
    (``STORED``); None without an adapter."""
    if adapter is None:
        return None

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0

    total = 0
    for folder in [Path(adapter), *map(Path, members)]:
        total += size(folder)
        if method in STORED:
            total += size(folder / "posterior" / STORED[method])
    if method == "tfb":  # the Bayesian adapter replaces the LoRA at evaluation
        total -= size(Path(adapter))
    return total


def label(variant: Variant, args: argparse.Namespace) -> str:
    m = args.ensemble_size
    return variant.label.format(samples=args.samples, members=m, multiswag_samples=_multiple_of(args.samples, m))


COLUMNS = [  # (header, summary key, or "train" / "stored" (computed here), digits)
    ("ACC %", "accuracy_percent", 2), ("ECE %", "ece_percent", 2), ("NLL", "nll_nats", 4),
    ("Brier", "brier_sum_over_classes", 4), ("mean confidence", "confidence", 3), ("TV to MAP", "tv_map", 4),
    ("OOD AUROC", "ood_auroc", 3), ("eval examples/s", "examples_per_s", 2),
    ("evaluate s", "process", 0), ("peak memory / MAP", "rss", 2), ("train minutes", "train", 1),
    ("stored / MAP", "stored", 2),
]  # fmt: skip


def _value(result: dict, key: str, map_units: dict) -> float | None:
    if key in ("confidence", "tv_map"):
        probs, reference = _probs(result), map_units.get("probs")
        if not probs:
            return None
        if key == "confidence":
            return sum(max(p) for p in probs) / len(probs)
        return total_variation(probs, reference) if reference and len(reference) == len(probs) else None
    if key == "train":
        return None if result["train_seconds"] is None else result["train_seconds"] / 60
    if key == "process":
        return result.get("eval_process_seconds")
    if key in ("stored", "rss"):  # over the MAP run's of the same seed
        mine = result["summary"].get("peak_rss_bytes") if key == "rss" else result.get("stored_bytes")
        return None if mine is None or not map_units.get(key) else mine / map_units[key]
    value = result["summary"].get(key)
    return None if value is None else float(value)


@functools.cache
def _read_predictions(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(Path(path).read_text(encoding="utf-8"))) if os.path.isfile(path) else ()


def _predictions(result: dict) -> tuple[dict, ...]:
    """evaluate.py's per-question predictions of a run, in test-set order (empty when they are gone); each file is
    read once per report (``write_report`` clears the cache)."""
    name = f"{result['summary'].get('dataset')}_predictions.json"
    return _read_predictions(str(Path(result.get("eval_dir") or "") / name))


def _probs(result: dict) -> list[list[float]]:
    return [p["probs"] for p in _predictions(result)]


def total_variation(probs: list[list[float]], reference: list[list[float]]) -> float:
    """Mean over questions of the total variation distance 1/2 sum_k |p_k - q_k| between two predictives: how far a
    posterior moves the MAP's answer distribution (0: not at all; 1: disjoint)."""
    return sum(0.5 * sum(abs(a - b) for a, b in zip(p, q)) for p, q in zip(probs, reference)) / len(probs)


def _map_units(results: list[dict], seed: int) -> dict:
    """The MAP LoRA's of ``seed``: its adapter's bytes on disk (``stored``), its evaluation's peak resident memory
    (``rss``) and option probabilities (``probs``, when the lora row ran); the units of the MAP-relative columns."""
    units = {}
    for r in results:
        if r.get("seed") != seed:
            continue
        if r.get("row") == "lora" and r.get("summary", {}).get("peak_rss_bytes"):
            units["rss"] = r["summary"]["peak_rss_bytes"]
        if r.get("row") == "lora" and r.get("summary"):
            units["probs"] = _probs(r) or None
        if "stored" not in units and r.get("train_command") and r.get("eval_dir"):
            folder = _adapter_of(r)
            if folder.name == "train-lora" and folder.is_dir():
                units["stored"] = sum(f.stat().st_size for f in folder.glob("adapter_model.safetensors"))
    return units


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(args: argparse.Namespace, results: list[dict]) -> list[dict]:
    """One table row per variant: mean (and sample std over seeds where a seed changes the run) of every column."""
    rows = []
    units = {seed: _map_units(results, seed) for seed in {r.get("seed") for r in results}}  # once per seed
    for method, variant in args.rows:
        runs = [r for r in results if r["row"] == variant.key and "reused_from_seed" not in r]
        row = {"method": method, "row": variant.key, "label": label(variant, args), "n_runs": len(runs)}
        for header, key, _ in COLUMNS:
            values = [v for v in (_value(r, key, units[r.get("seed")]) for r in runs) if v is not None]
            row[header] = None if not values else dict(zip(("mean", "std"), mean_std(values)))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| method | " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = []
        for header, _, digits in COLUMNS:
            cell = row[header]
            if cell is None:
                cells.append("–")
            else:
                std = "" if cell["std"] is None else f" ± {cell['std']:.{digits}f}"
                cells.append(f"{cell['mean']:.{digits}f}{std}")
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conclusion(rows: list[dict]) -> str:
    """One line saying what the table shows: the MAP's ECE against zero-shot's, the best-calibrated other row and
    temperature scaling's, each with its accuracy (means over the seeds run)."""

    def cell(row: dict, header: str) -> float | None:
        return None if row.get(header) is None else row[header]["mean"]

    by_row = {r["row"]: r for r in rows}
    fine_tuned = by_row.get("lora")
    if fine_tuned is None or cell(fine_tuned, "ECE %") is None:
        return "no LoRA (MAP) row: nothing to compare against"
    ece, acc = cell(fine_tuned, "ECE %"), cell(fine_tuned, "ACC %")
    parts = [f"MAP LoRA: ECE {ece:.1f} % at {acc:.1f} % accuracy"]
    if "zero-shot" in by_row:
        zero = by_row["zero-shot"]
        parts[0] += f" (zero-shot {cell(zero, 'ECE %'):.1f} % / {cell(zero, 'ACC %'):.1f} %)"
    others = [r for r in rows if r["row"] not in ("lora", "zero-shot") and cell(r, "ECE %") is not None]
    best = min(others, key=lambda r: cell(r, "ECE %")) if others else None
    if best is not None:
        ratio = cell(best, "ECE %") / ece if ece else float("nan")
        parts.append(
            f"lowest ECE: {best['label']} {cell(best, 'ECE %'):.1f} % ({ratio:.2f} x the MAP's) at "
            f"{cell(best, 'ACC %'):.1f} % accuracy"
        )
    if "temperature" in by_row and best is not None and best["row"] != "temperature":
        t = by_row["temperature"]
        parts.append(f"temperature scaling {cell(t, 'ECE %'):.1f} % at {cell(t, 'ACC %'):.1f} %")
    for row in rows:  # each sampled BayesLoRA row against the MAP: the papers' claim is about half its ECE or less
        if row["row"].endswith(":samples") and row is not best and cell(row, "ECE %") is not None and ece:
            parts.append(
                f"{row['label']} {cell(row, 'ECE %'):.1f} % ({cell(row, 'ECE %') / ece:.2f} x the MAP's) "
                f"at {cell(row, 'ACC %'):.1f} %"
            )
    return "; ".join(parts)


def copy_diagrams(results: list[dict], out: Path, stem: str) -> list[str]:
    """evaluate.py's reliability PNG of every run, copied (atomically) as ``<stem>_<row>_seed<k>.png``."""
    copied = []
    for r in results:
        src = r["summary"].get("reliability_diagram")
        if "reused_from_seed" in r or not src or not os.path.isfile(src):
            continue
        dest = out / f"{stem}_{slug(r['row'])}_seed{r['seed']}.png"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".png")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        r["reliability_png"] = str(dest)
        copied.append(str(dest))
    return copied


def _confidences(result: dict) -> list[tuple[float, bool]]:
    return [(max(p["probs"]), bool(p["correct"])) for p in _predictions(result)]


def combined_figure(args: argparse.Namespace, results: list[dict], path: Path) -> str | None:
    """One reliability panel per row, pooled over seeds; None (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no combined reliability figure (matplotlib is not installed)")
        return None
    from peft_bayes.metrics import confidence_bins, confidence_calibration_error, save_figure_atomic

    n = len(args.rows)
    cols = n if n <= 4 else 3
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.4 * ((n + cols - 1) // cols)))
    axes = [axes] if n == 1 else list(getattr(axes, "flat", axes))
    for ax, (_, variant) in zip(axes, args.rows):
        runs = [r for r in results if r["row"] == variant.key and "reused_from_seed" not in r]
        pairs = [pc for r in runs for pc in _confidences(r)]
        conf, correct = [c for c, _ in pairs], [float(ok) for _, ok in pairs]
        bins = confidence_bins(conf, correct, ECE_BINS)
        filled = bins["count"] > 0
        centers = [(b + 0.5) / ECE_BINS for b in range(ECE_BINS) if filled[b]]
        accs = bins["accuracy"][filled].tolist()
        ece = confidence_calibration_error(conf, correct, ECE_BINS) if pairs else 0.0
        ax.bar(centers, accs, width=1 / ECE_BINS, edgecolor="black")
        ax.plot([0, 1], [0, 1], "--", color="gray")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{label(variant, args)}\nECE {100 * ece:.1f}% (n={len(pairs)}, {len(runs)} seed(s))", fontsize=9)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"{args.base_model}, {args.task} ({args.choice_format}), first {args.n_test} test questions")
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def _adapter_of(result: dict) -> Path | None:
    command = result.get("train_command") or ""
    return Path(command.split("--output_dir ", 1)[1].split(" ", 1)[0]) if "--output_dir " in command else None


def sigma_trajectories(results: list[dict]) -> list[dict]:
    """Every BayesLoRA training's sigma over its optimizer steps (train.py's train_args.json), once per adapter."""
    out, seen = [], set()
    for r in results:
        folder = _adapter_of(r)
        if not r["method"].startswith("bayeslora") or folder is None or folder in seen:
            continue
        seen.add(folder)
        path = folder / "train_args.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            out.append(
                {
                    "method": r["method"],
                    "seed": r["seed"],
                    "optimizer": saved.get("bayes_optimizer"),
                    "trajectory": saved.get("sigma_trajectory", []),
                }
            )
    return out


def sigma_figure(args: argparse.Namespace, trajectories: list[dict], path: Path) -> str | None:
    """sigma's mean (solid) and max (dotted) over the optimizer steps, one line per training; None without
    matplotlib or without BayesLoRA rows."""
    if not trajectories or not any(t["trajectory"] for t in trajectories):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no sigma figure (matplotlib is not installed)")
        return None
    from peft_bayes.metrics import save_figure_atomic

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"blob": "tab:blue", "single": "tab:orange"}
    names = {"blob": "BLoB's two optimizers", "single": "one AdamW"}
    labelled = set()
    for t in trajectories:
        steps = [e["step"] for e in t["trajectory"]]
        color = colors.get(t["optimizer"], "gray")
        name = names.get(t["optimizer"], str(t["optimizer"]))
        ax.plot(
            steps,
            [e["sigma_mean"] for e in t["trajectory"]],
            color=color,
            label=None if name in labelled else f"{name}: mean sigma",
        )
        ax.plot(
            steps,
            [e["sigma_max"] for e in t["trajectory"]],
            ":",
            color=color,
            label=None if name in labelled else f"{name}: max sigma",
        )
        labelled.add(name)
    ax.axhspan(args.bayes_eps**2 / 2, args.bayes_eps**2, color="gray", alpha=0.2, label="initial sigma range")
    ax.set(yscale="log", xlabel="optimizer step", ylabel="posterior std sigma of A")
    ax.set_title(f"BayesLoRA sigma, {args.task} ({args.choice_format}), seeds {args.seeds}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def report_stem(args: argparse.Namespace) -> str:
    return f"{STEM}_{args.task}" + (f"_{args.tag}" if args.tag else "") + ("_val" if args.split == "val" else "")


def write_report(args, results: list[dict], runner, extra: dict) -> tuple[str, str]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _read_predictions.cache_clear()  # evaluations rerun since the last report rewrote their files
    stem = report_stem(args)
    rows = aggregate(args, results)
    md = markdown(rows)
    pngs = copy_diagrams(results, out, stem)
    combined = combined_figure(args, results, out / f"{stem}_reliability.png")
    sigmas = sigma_trajectories(results)
    sigma_png = sigma_figure(args, sigmas, out / f"{stem}_sigma.png")
    settings = {k: v for k, v in vars(args).items() if k != "rows"}
    settings["methods"] = [v.key for _, v in args.rows]
    record = {"settings": settings, **extra, "commands": runner.commands, "table": rows, "table_markdown": md,
              "results": results, "reliability_diagrams": pngs, "combined_reliability_diagram": combined,
              "sigma_trajectories": sigmas, "sigma_figure": sigma_png,
              "wall_time_minutes": round((time.perf_counter() - runner.t0) / 60, 2)}  # fmt: skip
    title = f"{args.base_model} on {args.task} ({args.choice_format}, {args.prompt_template} prompts)"
    scored = "test" if args.split == "test" else "validation (train.json outside the training slice)"
    header = f"{title}: {args.n_train} training / first {args.n_test} {scored} questions, seeds {args.seeds}\n\n"
    summary_line = conclusion(rows)
    record["conclusion"] = summary_line
    write_json_atomic(str(out / f"{stem}.json"), record)
    write_text_atomic(out / f"{stem}.md", header + md + "\n\n" + summary_line + "\n")
    return md, summary_line
