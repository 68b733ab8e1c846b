#!/usr/bin/env bash
# infimed vs PyTorch + transformers on the same shapes and workloads (benches/compare.rs,
# benches/compare.py), one table with both figures and the ratio.
#
#   bash benches/compare.sh [small|3b] [ndarray|flex|cuda] [f32|bf16]
#
# CPU: both sides use the same thread count (THREADS, default: all cores). PyTorch needs the
# venv of tests/fixtures/requirements.txt (PYTHON, default ~/.cache/infimed-py/bin/python).
# On a GPU machine without a Rust toolchain, run the prebuilt bench binary (INFIMED_BENCH) and
# compare.py yourself: see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:-small}
backend=${2:-ndarray}
precision=${3:-f32}
threads=${THREADS:-$(nproc)}
python=${PYTHON:-$HOME/.cache/infimed-py/bin/python}
out=${OUT:-runs/compare}
mkdir -p "$out"
export RAYON_NUM_THREADS=$threads
if [[ -n "${INFIMED_BENCH:-}" ]]; then
  "$INFIMED_BENCH" --shape "$shape" --backend "$backend" --precision "$precision" --json "$out/infimed-$shape.json"
else
  cargo bench --bench compare -- --shape "$shape" --backend "$backend" --precision "$precision" \
    --json "$out/infimed-$shape.json"
fi
device=cpu
[[ "$backend" == cuda ]] && device=cuda
"$python" benches/compare.py --shape "$shape" --threads "$threads" --device "$device" --dtype "$precision" \
  --json "$out/pytorch-$shape.json" --infimed "$out/infimed-$shape.json"
