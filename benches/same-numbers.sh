#!/usr/bin/env bash
# Same numbers before and after a change: the demo SFT (20 steps) then the demo GRPO (20 steps from
# that SFT) on ndarray with the recipes' fixed seeds, evaluation and checkpoints every 10 steps, the
# SFT's samples and GRPO's completions logged. Run it with the binary from before and the one from
# after, then compare the two folders:
#
#   bash benches/same-numbers.sh OLD_BINARY /tmp/before
#   bash benches/same-numbers.sh target/release/infimed /tmp/after
#   python3 benches/same_numbers.py /tmp/before /tmp/after     # prints SAME or DIFFER
set -euo pipefail
BIN=$(realpath "$1"); OUT=$2
cd "$(dirname "$0")/.."
if [ -e "$OUT" ]; then echo "$OUT exists: give a new folder" >&2; exit 2; fi
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
DATA=$OUT/data
"$BIN" demo-data --out "$DATA" >/dev/null
"$BIN" sft --recipe recipes/demo-sft.toml --set backend=ndarray --set max_steps=20 \
  --set output_dir="$OUT/sft" --set data.0.path="$DATA/train.jsonl" --set eval_data.0.path="$DATA/val.jsonl" \
  --set eval_every=10 --set save_every=10 --set log_samples=true >"$OUT/sft.out" 2>"$OUT/sft.err"
"$BIN" grpo --recipe recipes/demo-grpo.toml --set backend=ndarray --set max_steps=20 --set model="$OUT/sft" \
  --set output_dir="$OUT/grpo" --set data="$DATA/rl_train.jsonl" --set eval_data="$DATA/rl_val.jsonl" \
  --set eval_every=10 --set eval_limit=32 --set save_every=10 --set log_completions_every=5 \
  >"$OUT/grpo.out" 2>"$OUT/grpo.err"
echo "$OUT: sft and grpo done"
