#!/usr/bin/env python3
"""PyTorch + transformers' half of the infimed-vs-PyTorch comparison (see benches/compare.rs for
the workloads; benches/compare.sh runs both halves and prints the table).

    python benches/compare.py --shape small --threads 2 [--device cpu|cuda] [--dtype f32|bf16]
        [--rows vision,lm,sft,gen] [--repeat N] [--json OUT] [--infimed INFIMED.json]

The model is `Qwen2_5_VLForConditionalGeneration` built from the same config file
(benches/shapes/SHAPE.json) with transformers' random init, attention "sdpa". f32 on the CPU with
`torch.set_num_threads(threads)`; bf16 on a GPU (weights in bf16, AdamW on them, as a plain
`model.to(torch.bfloat16)` run does; `--dtype f32` for f32). With `--infimed F` (the JSON written
by `cargo bench --bench compare -- --json F`) it prints one table with both figures and the ratio
infimed / PyTorch (> 1: infimed faster).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

WORK = {
    "small": dict(images=[(1, 32, 32)], lm=(4, 256), sft=(4, 256), prompt=64, new_tokens=32, gen_batches=[1, 16]),
    "3b": dict(images=[(1, 36, 36)] * 4, lm=(1, 4096), sft=(4, 4096), prompt=512, new_tokens=64, gen_batches=[16, 256]),
}


def ids(length, seed, vocab):
    return [(i * 7919 + seed * 104729 + 13) % (vocab - 16) for i in range(length)]


def reset_peak(device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_mib(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", choices=sorted(WORK))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["f32", "bf16"])
    ap.add_argument("--rows", default="vision,lm,sft,gen")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--infimed", help="infimed's JSON (cargo bench --bench compare -- --json F): print the table")
    a = ap.parse_args()
    dtype_name = a.dtype or ("bf16" if a.device == "cuda" else "f32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    here = os.path.dirname(os.path.abspath(__file__))
    cfg_dict = json.load(open(os.path.join(here, "shapes", f"{a.shape}.json")))
    cfg = Qwen2_5_VLConfig(**cfg_dict)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(device=a.device, dtype=dtype)
    w = WORK[a.shape]
    vocab = cfg_dict["vocab_size"]
    dev = a.device
    rows_wanted = a.rows.split(",")
    rows = []

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(name, unit, amount, fn):
        fn()
        sync()
        reset_peak(dev)
        secs = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            fn()
            sync()
            secs.append(time.perf_counter() - t)
        s = statistics.median(secs)
        print(f"{name:<16} {amount / s:>12.1f} {unit}  ({s:.4f} s median of {a.repeat})", file=sys.stderr)
        rows.append(dict(name=name, unit=unit, value=amount / s, seconds=s, peak_mib=peak_mib(dev)))

    visual = model.model.visual if hasattr(model.model, "visual") else model.visual
    if "vision" in rows_wanted:
        grids = torch.tensor(w["images"], device=dev)
        n = int(grids.prod(-1).sum())
        dim = 3 * cfg.vision_config.temporal_patch_size * cfg.vision_config.patch_size ** 2
        pixels = ((torch.arange(n * dim, device=dev) * 37 % 101).float() / 50 - 1).reshape(n, dim).to(dtype)

        def vision():
            with torch.no_grad():
                visual(pixels, grid_thw=grids)

        timed("vision forward", "patches/s", n, vision)
    if "lm" in rows_wanted:
        b, t = w["lm"]
        x = torch.tensor([ids(t, s, vocab) for s in range(b)], device=dev)

        def lm():
            with torch.no_grad():
                model(input_ids=x, use_cache=False)

        timed("LM forward", "tokens/s", b * t, lm)
    if "sft" in rows_wanted:
        b, t = w["sft"]
        x = torch.tensor([ids(t, s, vocab) for s in range(b)], device=dev)
        labels = x.clone()
        labels[:, : t // 2] = -100
        for p in visual.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        model.train()

        def sft():
            loss = model(input_ids=x, labels=labels, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        timed("SFT step", "tokens/s", b * t, sft)
        model.eval()
        del opt
    if "gen" in rows_wanted:
        for b in w["gen_batches"]:
            x = torch.tensor([ids(w["prompt"], s, vocab) for s in range(b)], device=dev)
            att = torch.ones_like(x)

            def gen():
                with torch.no_grad():
                    out = model.generate(input_ids=x, attention_mask=att, max_new_tokens=w["new_tokens"],
                                         min_new_tokens=w["new_tokens"], do_sample=False, pad_token_id=cfg_dict["pad_token_id"])
                assert out.shape[1] == w["prompt"] + w["new_tokens"]

            timed(f"generate b{b}", "tokens/s", b * w["new_tokens"], gen)

    result = dict(system="pytorch", torch=torch.__version__, shape=a.shape, device=dev, dtype=dtype_name,
                  threads=a.threads, rows=rows)
    if a.json:
        json.dump(result, open(a.json, "w"), indent=2)
    if a.infimed:
        print_table(json.load(open(a.infimed)), result)
    elif not a.json:
        print(json.dumps(result, indent=2))


def print_table(inf, pt):
    print(f"\nshape {pt['shape']}: infimed ({inf['backend']}, {inf['precision']}, {inf['threads']} threads) vs "
          f"PyTorch {pt['torch']} ({pt['device']}, {pt['dtype']}, {pt['threads']} threads)\n")
    print("| row | unit | infimed | PyTorch | ratio | peak MiB infimed | peak MiB PyTorch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    by = {r["name"]: r for r in pt["rows"]}
    for r in inf["rows"]:
        p = by.get(r["name"])
        if p is None:
            continue
        fmt = lambda m: "-" if m is None else f"{m:.0f}"
        print(f"| {r['name']} | {r['unit']} | {r['value']:.1f} | {p['value']:.1f} | {r['value'] / p['value']:.2f} | "
              f"{fmt(r.get('peak_mib'))} | {fmt(p.get('peak_mib'))} |")


if __name__ == "__main__":
    main()
