#!/usr/bin/env bash
# 3B checkpoint load + save, infimed and transformers interleaved (BENCHMARKS.md, "Checkpoints").
# Before each run the page cache is dropped (needs root; skipped otherwise) and the checkpoint read
# once, so both start from the same memory state: files cached, the rest of memory free.
#
#   bash benches/load_ab.sh DIR [ROUNDS]      # DIR from: python tests/fixtures/make_fixtures.py --big3b DIR
#
# INFIMED_OLD=PATH adds a second infimed binary (an earlier build) to each round, before the first.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1
rounds=${2:-3}
infimed=${INFIMED:-${CARGO_TARGET_DIR:-target}/release/infimed}
python=${PYTHON:-$HOME/.cache/infimed-py/bin/python}
out=${OUT:-$(mktemp -d)}
prep() {
  rm -rf "$out/infimed" "$out/transformers"
  sync
  if [[ -w /proc/sys/vm/drop_caches ]]; then echo 3 > /proc/sys/vm/drop_caches; fi
  cat "$dir"/*.safetensors > /dev/null
}
for _ in $(seq "$rounds"); do
  if [[ -n "${INFIMED_OLD:-}" ]]; then
    prep
    echo -n "old: "
    "$INFIMED_OLD" bench load --model "$dir" --save-to "$out/infimed"
  fi
  prep
  "$infimed" bench load --model "$dir" --save-to "$out/infimed"
  prep
  "$python" benches/load_compare.py "$dir" "$out/transformers" 2>/dev/null
done
rm -rf "$out/infimed" "$out/transformers"
