#!/bin/bash
# GPU smoke check (one GPU, at most 8 minutes): a tiny recipe on CUDA in bf16 for a few steps at TP=1,
# then benchmarks/objectives.py and benchmarks/fused_output_layer.py at their quick sizes on CUDA.
#
#   make install && benchmarks/gpu_check.sh
#   DRY_RUN=1 benchmarks/gpu_check.sh          (prints the commands only)
#
# Needs only the repository and `make install` (a CUDA build of torch: if the Makefile's torch is a CPU
# wheel on your index, reinstall with e.g. `make install TORCH="torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128"`). Exits non-zero when any step fails, a loss is not finite,
# the fused path disagrees with the materialised one beyond 1e-5 (fp32), or the 8-minute budget runs out.
# Environment: PYTHON (default .venv/bin/python), GPU_CHECK_OUT (default a new temporary directory),
# GPU_CHECK_BUDGET (seconds, default 480), STEPS (tiny recipe steps, default 6).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$REPO/.venv/bin/python}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
STEPS="${STEPS:-6}"
DRY="${DRY_RUN:-0}"
if [[ "$DRY" == 1 ]]; then
    OUT="${GPU_CHECK_OUT:-/tmp/gpu_check}"
else
    OUT="${GPU_CHECK_OUT:-$(mktemp -d -t distill-gpu-check-XXXXXX)}"
fi
cd "$REPO"
export PYTHONUNBUFFERED=1

TINY_OVERRIDES=(device=cuda training.precision=bf16 "training.steps=$STEPS" training.warmup_steps=1
    training.log_interval=1 checkpoint.interval=0 checkpoint.resume=none)
# The materialised logits (the switch's default, auto, runs the tiny recipe fused).
TINY=("$PY" -m distill_plugins.cli run recipes/tiny/base.yaml "${TINY_OVERRIDES[@]}" loss.fused_output_layer=false
    "output_dir=$OUT/tiny_bf16")
# The same run on the fused output layer, when the recipe schema has the switch (checked before running).
TINY_FUSED=("$PY" -m distill_plugins.cli run recipes/tiny/base.yaml "${TINY_OVERRIDES[@]}"
    loss.fused_output_layer=true "output_dir=$OUT/tiny_bf16_fused")
HAS_FUSED_SWITCH=("$PY" -m distill_plugins.cli check recipes/tiny/base.yaml loss.fused_output_layer=true)
BENCH_OBJECTIVES=("$PY" benchmarks/objectives.py --quick --device cuda --tp 1 --out "$OUT/objectives.json")
BENCH_FUSED=("$PY" benchmarks/fused_output_layer.py --quick --device cuda --tp 1 --out "$OUT/fused_output_layer.json")

if [[ "$DRY" == 1 ]]; then
    for cmd in TINY TINY_FUSED BENCH_OBJECTIVES BENCH_FUSED; do
        declare -n ref="$cmd"
        printf '%q ' "${ref[@]}"
        echo
    done
    exit 0
fi

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

# Runs a command under what is left of the budget, with a header and its wall time.
step() {
    local name="$1" left
    shift
    left=$((BUDGET - SECONDS))
    ((left > 0)) || fail "the ${BUDGET}s budget ran out before '$name'"
    echo "== $name (budget left ${left}s)"
    local start=$SECONDS
    timeout "$left" "$@" || fail "'$name' exited with status $? (command: $*)"
    echo "== $name: ok in $((SECONDS - start))s"
}

# Checks that metrics.jsonl of a run has one line per step with a finite loss.
check_metrics() {
    "$PY" - "$1/metrics.jsonl" "$STEPS" <<'EOF' || fail "metrics of $1"
import json, math, sys
path, steps = sys.argv[1], int(sys.argv[2])
lines = [json.loads(line) for line in open(path) if line.strip()]
train = [r for r in lines if "loss" in r and "step" in r]
assert len(train) >= steps, f"{path}: {len(train)} training lines, expected {steps}"
bad = [r["step"] for r in train if not math.isfinite(float(r["loss"]))]
assert not bad, f"{path}: non-finite loss at steps {bad}"
print(f"{path}: {len(train)} steps, loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}")
EOF
}

[[ -x "$PY" ]] || fail "$PY not found: run 'make install' first (or set PYTHON)"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    fail "torch.cuda.is_available() is False for $PY: install a CUDA build of torch (see the header of $0)"
mkdir -p "$OUT"
echo "gpu_check: output in $OUT"

step "tiny recipe, CUDA bf16, TP=1, $STEPS steps" "${TINY[@]}"
check_metrics "$OUT/tiny_bf16"
if "${HAS_FUSED_SWITCH[@]}" >/dev/null 2>&1; then
    step "tiny recipe, fused output layer" "${TINY_FUSED[@]}"
    check_metrics "$OUT/tiny_bf16_fused"
else
    echo "== tiny recipe, fused output layer: skipped (this checkout has no loss.fused_output_layer key)"
fi
step "benchmarks/objectives.py --quick --device cuda" "${BENCH_OBJECTIVES[@]}"
step "benchmarks/fused_output_layer.py --quick --device cuda" "${BENCH_FUSED[@]}"
"$PY" - "$OUT/fused_output_layer.json" <<'EOF' || fail "fused output layer accuracy"
import json, sys
report = json.load(open(sys.argv[1]))
missed = [c for c in report["targets"]["checks"] if not c["met"]]
assert not missed, f"targets missed: {missed}"
EOF
echo "gpu_check: all steps passed in ${SECONDS}s"
