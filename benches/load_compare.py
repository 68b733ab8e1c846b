"""transformers' side of the checkpoint load/save comparison (BENCHMARKS.md, "Checkpoints"):
`from_pretrained` of an HF Qwen2.5-VL folder in float32 on the CPU (what `infimed` loads: f32
parameters), then optionally `save_pretrained` in bf16. Prints one JSON line.

    python benches/load_compare.py DIR [SAVE_DIR]
"""
import json
import resource
import sys
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def main():
    src = sys.argv[1]
    base = rss_mib()
    t0 = time.time()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, dtype=torch.float32, low_cpu_mem_usage=True)
    load_s = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    out = {"system": "transformers", "bench": "load", "model": src, "params": params, "load_s": load_s,
           "weights_mib": 4 * params / 2**20, "baseline_mib": base, "peak_mib": peak,
           "peak_over_weights": (peak - base) / (4 * params / 2**20)}
    if len(sys.argv) > 2:
        t0 = time.time()
        model.to(torch.bfloat16).save_pretrained(sys.argv[2], max_shard_size="5GB")
        out["save_s"] = time.time() - t0
        out["save_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
