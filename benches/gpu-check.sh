#!/usr/bin/env bash
# Everything the scale issues ask of a GPU, in one run of under 8 minutes on one H200:
#   1. `infimed score` on the fixtures with --backend cuda: f32 within 1e-4 of transformers (2e-2
#      where an image is resized), bf16 within 2e-2 (of transformers' own bf16 run where committed);
#   2. `infimed bench sft --shape 3b --batch 4 --seq 4096 --backend cuda --precision bf16`
#      (per-layer checkpointing), tokens/s, MFU (H200 bf16 dense: 989 TFLOP/s) and memory;
#   3. `infimed bench generate --shape 3b --backend cuda --precision bf16 --batch 256
#      --prompt-len 512 --new-tokens 256`;
#   4. the same SFT step and generation in PyTorch + transformers when torch is installed there.
#
# Build the binary here first (`cargo build --release`), carry it: the device tool copies the
# working tree; pass the binary as INFIMED (default target/release/infimed or $CARGO_TARGET_DIR).
#   bash benches/gpu-check.sh > gpu-check.log
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${INFIMED:-${CARGO_TARGET_DIR:-target}/release/infimed}
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
echo "== device"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3

echo "== score parity (cuda f32, bf16)"
for ckpt in tiny-gqa2 tiny-gqa4-untied tiny-mha-newlayout; do
  for prec in f32 bf16; do
    timeout 120 "$bin" score --model "tests/fixtures/models/$ckpt" --data tests/fixtures/samples.jsonl \
      --out "$out/score-$ckpt-$prec.jsonl" --backend cuda --precision "$prec" > /dev/null 2> "$out/score-$ckpt-$prec.err" \
      || { echo "$ckpt $prec: FAILED"; tail -3 "$out/score-$ckpt-$prec.err"; continue; }
    "$py" - "$ckpt" "$prec" "$out/score-$ckpt-$prec.jsonl" <<'PY'
import json, sys
ckpt, prec, got = sys.argv[1:4]
ref = json.load(open(f"tests/fixtures/refs/{ckpt}/logprobs.json"))["samples"]
rows = [json.loads(l) for l in open(got)]
worst = {False: 0.0, True: 0.0}
for g, w in zip(rows, ref):
    assert g["target_ids"] == w["target_ids"], (ckpt, w["name"])
    d = max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"]))
    worst[w["resized"]] = max(worst[w["resized"]], d)
tol = 1e-4 if prec == "f32" else 2e-2
print(f"{ckpt} {prec}: max |dlogp| {worst[False]:.2e} (bound {tol}), resized images {worst[True]:.2e} (bound 2e-2)",
      "OK" if worst[False] < tol and worst[True] < 2e-2 else "OVER")
PY
  done
done

echo "== SFT step, 3b, 4 x 4096, bf16, per-layer checkpointing"
timeout 240 "$bin" bench sft --shape 3b --batch 4 --seq 4096 --backend cuda --precision bf16 \
  --gradient-checkpointing layer --steps 2 --warmup 1 --peak-tflops 989 | tee "$out/sft-3b.json"

echo "== generation, 3b, 256 x (512 + 256), bf16"
timeout 180 "$bin" bench generate --shape 3b --backend cuda --precision bf16 --batch 256 --prompt-len 512 \
  --new-tokens 256 --repeat 1 | tee "$out/generate-3b.json"

if "$py" -c "import torch, transformers" 2>/dev/null; then
  echo "== PyTorch + transformers (sdpa), same shapes"
  timeout 200 "$py" benches/compare.py --shape 3b --device cuda --dtype bf16 --rows sft,gen --json "$out/pytorch-3b.json" || true
else
  echo "== PyTorch not installed on this machine: no side-by-side"
fi
