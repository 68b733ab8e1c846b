"""Compare two folders written by benches/same-numbers.sh: every metrics.jsonl value (timing keys
aside), the exported weights (bytes of every tensor) and the logged samples/completions.
Prints a line per file and SAME or DIFFER (exit status 0 or 1). Standard library only."""
import hashlib
import json
import struct
import sys

TIMING = {"data_wait_s", "samples_per_s", "tokens_per_s", "rollout_tokens_per_s",
          "update_tokens_per_s", "step_secs"}


def records(path):
    out = {}
    for line in open(path):
        d = json.loads(line)
        kind = "eval" if any(k.startswith(("eval_", "val_")) for k in d) else "step"
        out[(d["step"], kind)] = d
    return out


def logged(path):
    """A samples/completions log with each `origin` cut to FILE:LINE (the data folders differ)."""
    rows = []
    for line in open(path):
        d = json.loads(line)
        if isinstance(d.get("origin"), str):
            d["origin"] = d["origin"].rsplit("/", 1)[-1]
        rows.append(d)
    return rows


def tensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    base = 8 + n
    return {k: (v["dtype"], v["shape"],
                hashlib.sha256(b[base + v["data_offsets"][0]:base + v["data_offsets"][1]]).hexdigest())
            for k, v in header.items() if k != "__metadata__"}


def main(a, b):
    ok = True
    for run in ["sft", "grpo"]:
        la, lb = records(f"{a}/{run}/metrics.jsonl"), records(f"{b}/{run}/metrics.jsonl")
        common = sorted(set(la) & set(lb))
        differ, new_keys = 0, set()
        for k in common:
            x, y = la[k], lb[k]
            new_keys |= set(y) - set(x)
            for key in x:
                if key not in TIMING and x[key] != y.get(key, "MISSING"):
                    differ += 1
                    print(run, k, key, x[key], y.get(key, "MISSING"))
        only_a, only_b = sorted(set(la) - set(lb)), sorted(set(lb) - set(la))
        print(f"{run}: {len(common)} records in both, {differ} values differ (timing aside); "
              f"new keys after: {sorted(new_keys)}; only before: {only_a}; only after: {only_b}")
        ok &= differ == 0 and not only_a and not only_b
        ta, tb = tensors(f"{a}/{run}/model.safetensors"), tensors(f"{b}/{run}/model.safetensors")
        print(f" {run}/model.safetensors: {len(ta)} tensors, "
              f"{'identical values' if ta == tb else 'DIFFERENT'}")
        ok &= ta == tb
        for f in ["completions.jsonl", "samples.jsonl"]:
            try:
                same = logged(f"{a}/{run}/{f}") == logged(f"{b}/{run}/{f}")
            except FileNotFoundError:
                continue
            print(f" {run}/{f}: {'identical' if same else 'DIFFERENT'}")
            ok &= same
    print("SAME" if ok else "DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
