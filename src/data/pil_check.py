"""Writes PIL / transformers reference outputs for the parity test of src/data/image.rs.

Usage (needs Pillow, numpy and transformers):
    python src/data/pil_check.py OUT_DIR
    INFIMED_PIL_CHECK_DIR=OUT_DIR cargo test --release --lib data::image::tests::parity -- --nocapture

OUT_DIR/manifest.json lists
  resize:  {"input": png, "output": png, "size": [w, h], "output_legacy": png, "output_v12_2": png}
           PIL Image.resize(size, BICUBIC) (needs Pillow 13), and the pass orders of Pillow <= 12.1
           and 12.2-12.3 simulated with one-axis resizes
  process: {"input": file, "values": f32 LE .bin, "rows", "cols", "grid", "min_pixels", "max_pixels"}
           Qwen2VLImageProcessor (slow, PIL path) pixel_values on PIL.Image.open(input)
  decode:  {"input": jpeg, "decoded": png}                   PIL's decoding of the JPEG (RGB)
"""

import json
import os
import sys

import numpy as np
from PIL import Image


def pattern(w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    r = (x * 37 + y * 91 + 13) % 256
    g = (x * x * 7 + y * 3) % 256
    b = ((x ^ y) * 29 + 200) % 256
    return np.stack([r, g, b], -1).astype(np.uint8)


def smooth(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.002, 0.08), rng.uniform(0.002, 0.08), rng.uniform(0, 6.28)
        out.append(127.5 + 120 * np.sin(x * fx + y * fy + ph) + rng.normal(0, 6, (h, w)))
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


def noise(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def main(out):
    os.makedirs(out, exist_ok=True)
    manifest = {"resize": [], "process": [], "decode": []}

    resize_cases = [
        ("noise", 37, 23, 56, 56),
        ("smooth", 640, 480, 644, 476),
        ("smooth", 1000, 700, 504, 336),
        ("noise", 300, 200, 300, 112),
        ("noise", 300, 200, 140, 200),
        ("pattern", 113, 97, 29, 251),
        ("noise", 3, 700, 28, 336),
        ("smooth", 5, 800, 7, 120),
        ("smooth", 1920, 1080, 672, 364),
        ("noise", 5, 5, 1, 1),
        ("pattern", 2, 3, 200, 1),
        ("noise", 77, 1, 1000, 3),
        ("pattern", 999, 13, 28, 28),
    ]
    for i, (kind, w, h, ow, oh) in enumerate(resize_cases):
        arr = {"noise": lambda: noise(w, h, i), "smooth": lambda: smooth(w, h, i), "pattern": lambda: pattern(w, h)}[kind]()
        src = f"resize_{i}_in.png"
        dst = f"resize_{i}_out.png"
        im = Image.fromarray(arr, "RGB")
        im.save(os.path.join(out, src))
        im.resize((ow, oh), Image.BICUBIC).save(os.path.join(out, dst))
        # Older Pillow pass orders, simulated with one-axis calls (each call does one pass).
        legacy = im.resize((ow, h), Image.BICUBIC).resize((ow, oh), Image.BICUBIC)
        if h > w * 100 and oh < h:
            v12_2 = im.resize((w, oh), Image.BICUBIC).resize((ow, oh), Image.BICUBIC)
        else:
            v12_2 = legacy
        legacy.save(os.path.join(out, f"resize_{i}_legacy.png"))
        v12_2.save(os.path.join(out, f"resize_{i}_v12_2.png"))
        manifest["resize"].append({"input": src, "output": dst, "size": [ow, oh],
                                   "output_legacy": f"resize_{i}_legacy.png",
                                   "output_v12_2": f"resize_{i}_v12_2.png"})

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    proc_cases = []
    a = smooth(56, 84, 100); Image.fromarray(a).save(os.path.join(out, "proc_0.png"))
    proc_cases.append(("proc_0.png", 3136, 12845056))
    a = smooth(640, 480, 101); Image.fromarray(a).save(os.path.join(out, "proc_1.png"))
    proc_cases.append(("proc_1.png", 3136, 12845056))
    a = smooth(1000, 700, 102); Image.fromarray(a).save(os.path.join(out, "proc_2.png"))
    proc_cases.append(("proc_2.png", 3136, 262144))
    a = smooth(300, 451, 103)[..., 0]; Image.fromarray(a, "L").save(os.path.join(out, "proc_3.png"))
    proc_cases.append(("proc_3.png", 3136, 262144))
    a = np.concatenate([noise(123, 77, 104), noise(123, 77, 105)[..., :1]], -1)
    Image.fromarray(a, "RGBA").save(os.path.join(out, "proc_4.png"))
    proc_cases.append(("proc_4.png", 3136, 262144))
    a = (smooth(90, 60, 106)[..., 0].astype(np.uint16) * 3)
    Image.fromarray(a).save(os.path.join(out, "proc_5.png"))  # 16-bit gray
    proc_cases.append(("proc_5.png", 3136, 262144))
    a = smooth(20, 30, 107); Image.fromarray(a).save(os.path.join(out, "proc_6.png"))  # upscale
    proc_cases.append(("proc_6.png", 3136, 262144))
    a = smooth(800, 600, 108); Image.fromarray(a).save(os.path.join(out, "proc_7.jpg"), quality=90)
    proc_cases.append(("proc_7.jpg", 3136, 262144))

    for i, (name, mn, mx) in enumerate(proc_cases):
        p = Qwen2VLImageProcessor(min_pixels=mn, max_pixels=mx)
        r = p(images=[Image.open(os.path.join(out, name))], return_tensors="np")
        pv = np.asarray(r["pixel_values"], dtype=np.float32)
        grid = [int(x) for x in r["image_grid_thw"][0]]
        vals = f"proc_{i}_values.bin"
        pv.astype("<f4").tofile(os.path.join(out, vals))
        manifest["process"].append(
            {"input": name, "values": vals, "rows": pv.shape[0], "cols": pv.shape[1], "grid": grid,
             "min_pixels": mn, "max_pixels": mx}
        )

    for i, (sub, q) in enumerate([(2, 90), (0, 95), (1, 75)]):
        a = smooth(333, 217, 200 + i)
        name = f"decode_{i}.jpg"
        Image.fromarray(a).save(os.path.join(out, name), quality=q, subsampling=sub)
        Image.open(os.path.join(out, name)).convert("RGB").save(os.path.join(out, f"decode_{i}.png"))
        manifest["decode"].append({"input": name, "decoded": f"decode_{i}.png"})

    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1])
