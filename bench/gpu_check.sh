#!/usr/bin/env bash
# The GPU check: one command that, on a CUDA machine, installs what its image lacks, runs the compiled kernel tests
# and the CUDA smoke test, the three kernel benchmarks, and prints the targets as met / missed.
#
#   bash bench/gpu_check.sh                    # on the GPU machine (about 8 minutes on an H200)
#   bash bench/gpu_check.sh --dry-run          # the same steps on CPU at tiny shapes (Triton's interpreter), ~3 min
#   bash bench/gpu_check.sh --only kernels,smoke --out DIR
#   bash bench/gpu_check.sh --only tune        # the fused layer's tile sizes at the target shape
#
# Steps (--only picks some; they run in this order): install (every wheel in --wheels, default .whl/, into a private
# site folder first on PYTHONPATH; `pip download` them into the checkout: see bench/README.md), env (GPU, driver,
# python / torch / triton / transformers / peft / bitsandbytes versions), kernels (tests/kernels, compiled),
# sampled_lora (bench_sampled_lora.py at 4096x4096, 512 and 4096 tokens, ranks 8-128, bf16, fp and NF4 bases), smoke
# (tests/test_cuda_smoke.py), kfac (bench_kfac.py's curvature pass against a gradient pass on a 2048-wide tiny LLaMA,
# bf16), step (bench_bayeslora_step.py --preset 1b --base fp,nf4 --dtype bfloat16), targets (bench/gpu_targets.py:
# met / missed); tune, only when --only names it, runs right after sampled_lora (bench_sampled_lora.py --tiles: the
# fused layer at 4096x4096 and 4096 tokens with several tile sizes, into tune/). Each step has its own time limit;
# a failing step is recorded and the rest still run; --deadline S shortens the limits so that everything ends within
# S seconds. Results (logs, the
# benchmarks' JSON / markdown, env.json, targets.md, steps.tsv) are packed into OUT/gpu_check.tar.gz after every
# step, so a run cut short still returns what it finished, and OUT/summary.md holds the step table and the targets.
# OUT is --out, else $OUT (the device tool's output folder), else bench/results/gpu_check. Exit status: 0 when every
# step ran and passed, 1 otherwise (missed targets do not fail).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
ONLY=""
DEST="${OUT:-$ROOT/bench/results/gpu_check}"
WHEELS="$ROOT/.whl"
ALL_STEPS="install env kernels sampled_lora tune smoke kfac step targets"
DEFAULT_STEPS="install env kernels sampled_lora smoke kfac step targets"  # tune: a call of its own
DEADLINE=0

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY="${2:?--only needs a comma list of steps}"; shift ;;
        --out) DEST="${2:?--out needs a folder}"; shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder}"; shift ;;
        --deadline) DEADLINE="${2:?--deadline needs seconds}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
STEPS="$DEFAULT_STEPS"
if [ -n "$ONLY" ]; then
    STEPS=""
    for s in ${ONLY//,/ }; do
        case " $ALL_STEPS " in
            *" $s "*) STEPS="$STEPS $s" ;;
            *) echo "gpu_check.sh: unknown step '$s' in --only (known: ${ALL_STEPS// /, })" >&2; exit 2 ;;
        esac
    done
fi

mkdir -p "$DEST" || exit 2
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
RES="$WORK/results"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 PEFT_BAYES_SMOKE_ON_CPU=1 CUDA_VISIBLE_DEVICES=""
    MODE="dry run (CPU, Triton interpreter, tiny shapes: checks the steps, its times mean nothing)"
else
    unset TRITON_INTERPRET
    MODE="GPU"
fi
XDIST=()
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 16); fi  # Triton compiles in parallel

printf 'step\tstatus\tseconds\n' > "$WORK/steps.tsv"
FAILED=0
START=$(date +%s)

pack() {  # everything so far, so that a run stopped by its time limit still returns its results
    tar -czf "$DEST/gpu_check.tar.gz.tmp" --exclude=./site -C "$WORK" . 2>/dev/null &&
        mv "$DEST/gpu_check.tar.gz.tmp" "$DEST/gpu_check.tar.gz"  # ./site: the installed wheels, not results
    {
        echo "# GPU check: $MODE"
        echo
        echo "| step | status | seconds |"
        echo "|---|---|---:|"
        tail -n +2 "$WORK/steps.tsv" | awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}'
        echo
        [ -f "$WORK/targets.md" ] && cat "$WORK/targets.md"
    } > "$DEST/summary.md"
}

run_step() {  # name, time limit (s), command...: logs to WORK/<name>.log, status to steps.tsv
    local name="$1" limit="$2"
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local t0 rc status
    t0=$(date +%s)
    if [ "$DEADLINE" -gt 0 ] && [ "$name" != targets ]; then  # ends by the deadline, 20 s kept for targets + packing
        local left=$(( DEADLINE - (t0 - START) - 20 ))
        if [ "$left" -lt 10 ]; then
            printf '%s\t%s\t0\n' "$name" "skipped: --deadline ${DEADLINE} s reached" >> "$WORK/steps.tsv"
            echo "[$(( t0 - START )) s] $name: skipped (deadline)"; FAILED=1; pack; return 0
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "[$(( t0 - START )) s] $name: $* (limit ${limit} s; log $name.log)"
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="passed" ;;
        124|137) status="timed out after ${limit} s"; FAILED=1 ;;
        *) status="failed (exit $rc)"; FAILED=1 ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$WORK/steps.tsv"
    echo "[$(( $(date +%s) - START )) s] $name: $status"
    [ "$status" = passed ] || tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
    pack
}

install_wheels() {
    if [ "$DRY" = 1 ]; then echo "dry run: this machine's packages are used; wheels not installed"; return 0; fi
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then echo "no wheels in $WHEELS: using the image's packages"; return 0; fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "${wheels[@]}"
}

env_report() {
    "$PY" - "$RES/env.json" <<'EOF'
import importlib, json, platform, subprocess, sys
info = {"python": platform.python_version(), "machine": platform.machine()}
for name in ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "peft_bayes"):
    try:
        module = importlib.import_module(name)
        info[name] = getattr(module, "__version__", "?") + f" ({module.__file__})"
    except Exception as err:  # report, do not stop: the later steps say what it breaks
        info[name] = f"not importable: {type(err).__name__}: {err}"
import torch
info["cuda"] = torch.version.cuda
info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
try:
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
except (OSError, subprocess.SubprocessError) as err:
    info["nvidia_smi"] = f"unavailable: {err}"
from peft_bayes.kernels.sampled_lora import triton_runtime
info["triton_runtime"] = triton_runtime()
json.dump(info, open(sys.argv[1], "w"), indent=2)
for key, value in info.items():
    print(f"{key}: {value}")
EOF
}

if [ "$DRY" = 1 ]; then
    KERNEL_TESTS=(tests/kernels -k "float32 or tiles_and_splits or dequantise or dispatch")
    SMOKE_TESTS=(tests/test_cuda_smoke.py -k "mixed_precision or map or bayeslora_samples or laplace_all or scoring")
    SAMPLED=(--device cpu --shapes 48x40 --tokens 16 --ranks 4 --dtype float32 --reps 2 --warmup 0)
    STEP=(--hidden_size 64 --num_layers 1 --num_heads 2 --seq_len 8 --batch_size 2 --steps 2 --repeats 1 --warmup 1
          --base fp,nf4 --kernel reference,triton --device cpu --threads 1)
    KFAC=(--device cpu --n 8 --batch_size 4 --repeats 1 --kernels reference,triton --sections pass)
    TUNE=(--device cpu --shapes 48x40 --tokens 16 --ranks 4 --dtype float32 --reps 1 --warmup 0 --bases fp
          --configs peft_lora,fused_bayeslora --tiles 16x16w2,32x32)
    LIMITS=(60 60 300 300 300 600 300 300 60)  # install env kernels sampled_lora tune smoke kfac step targets
else
    KERNEL_TESTS=(tests/kernels)
    SMOKE_TESTS=(tests/test_cuda_smoke.py)
    SAMPLED=(--shapes 4096x4096 --tokens 512,4096 --ranks 8,16,64,128 --bases fp,nf4 --dtype bfloat16)
    STEP=(--preset 1b --base fp,nf4 --dtype bfloat16 --steps 5 --repeats 2 --warmup 2)
    KFAC=(--device cuda --dtype bfloat16 --tiny_size 2048x4x16 --n 32 --batch_size 8 --sections pass)
    TUNE=(--shapes 4096x4096 --tokens 4096 --ranks 8,64,128 --bases fp --dtype bfloat16
          --configs peft_lora,reference_bayeslora,fused_bayeslora --tiles 32x64,32x128,64x64w8,64x128,128x64w8,128x128w8)
    LIMITS=(60 90 150 200 150 120 120 180 30)  # first H200 run: kernels 104 s (-n 8), sampled_lora ~130 s cold
fi

export -f install_wheels env_report
export DRY WHEELS WORK RES PY
run_step install "${LIMITS[0]}" bash -c install_wheels
if [ -d "$WORK/site" ]; then export PYTHONPATH="$WORK/site:$PYTHONPATH"; fi
run_step env "${LIMITS[1]}" bash -c env_report
run_step kernels "${LIMITS[2]}" "$PY" -m pytest -q -p no:cacheprovider -rs "${XDIST[@]}" "${KERNEL_TESTS[@]}"
run_step sampled_lora "${LIMITS[3]}" "$PY" bench/bench_sampled_lora.py "${SAMPLED[@]}" --output_dir "$RES"
run_step tune "${LIMITS[4]}" "$PY" bench/bench_sampled_lora.py "${TUNE[@]}" --output_dir "$RES/tune"
run_step smoke "${LIMITS[5]}" "$PY" -m pytest -q -p no:cacheprovider -rs "${SMOKE_TESTS[@]}"
run_step kfac "${LIMITS[6]}" "$PY" bench/bench_kfac.py "${KFAC[@]}" --output_dir "$RES"
run_step step "${LIMITS[7]}" "$PY" bench/bench_bayeslora_step.py "${STEP[@]}" --output_dir "$RES"
run_step targets "${LIMITS[8]}" "$PY" bench/gpu_targets.py "$RES" --output "$WORK/targets.md"
pack
cat "$DEST/summary.md"
echo "results: $DEST/gpu_check.tar.gz, $DEST/summary.md ($(( $(date +%s) - START )) s)"
rm -rf "$WORK"
exit $FAILED
