"""Speed of Phi-3-vision's image tower (CLIP ViT-L/14-336, features from hidden_states[-2]): phinano against
Transformers' CLIPVisionModel on the same random full-size weights, in one run.

    python scripts/bench_vision.py                  # one 336x336 crop and a whole 16-crop image (17 crops)
    python scripts/bench_vision.py --crops 4 --repeats 3 --dtype float32

Prints seconds for one crop on each side and for the whole image: phinano runs its crops as Vision.embed does
(`clip.features`, clip.GROUP crops side by side), Transformers in one batch. Weights are random: speed does not
depend on them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def random_tower(dtype: str) -> dict:
    from phinano.vision import clip

    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in clip.tower_shapes().items():
        a = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(np.prod(shape[1:]) or 1))
        tensors[name] = (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else a
    return tensors


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=16, help="the image's grid of crops (plus its global view)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of one crop; the best is reported")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="phinano's weights")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    args = parser.parse_args()

    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from phinano.kernels import backend
    from phinano.vision import clip

    threads = args.threads or os.cpu_count()
    ops = backend("numba")
    ops.set_threads(threads)
    torch.set_num_threads(threads)

    tensors = random_tower(args.dtype)
    tower = clip.load_tower(tensors)
    config = CLIPVisionConfig(hidden_act="quick_gelu", hidden_size=1024, image_size=336, intermediate_size=4096,
                              layer_norm_eps=1e-5, num_attention_heads=16, num_hidden_layers=24, patch_size=14)
    with torch.device("meta"):
        reference = CLIPVisionModel(config)
    state = {k.removeprefix(clip.PREFIX): torch.from_numpy(np.asarray(ops.widen(v)).copy()) for k, v in tensors.items()}
    reference.load_state_dict(state, assign=True, strict=True)
    reference.embeddings.position_ids = torch.arange(577)[None]
    reference.eval()

    rng = np.random.default_rng(1)
    crop = rng.standard_normal((1, 3, 336, 336)).astype(np.float32)
    image = rng.standard_normal((args.crops + 1, 3, 336, 336)).astype(np.float32)

    def ours(pixels):
        return clip.features(ops, tower, pixels)  # (N, P, C)

    def theirs(pixels):
        with torch.no_grad():
            return reference(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2]

    ours(crop)  # compile the kernels
    theirs(crop)
    difference = np.abs(ours(crop)[0] - theirs(crop)[0, 1:].numpy()).max()
    crop_ours, crop_theirs = best(lambda: ours(crop), args.repeats), best(lambda: theirs(crop), args.repeats)
    image_ours, image_theirs = best(lambda: ours(image), 1), best(lambda: theirs(image), 1)

    print(f"CPU: {cpu_name()}, {threads} threads; phinano weights {args.dtype}, Transformers float32; "
          f"phinano crops {clip.GROUP} at a time; {time.strftime('%Y-%m-%d')}")
    print(f"largest feature difference on one crop: {difference:.2e}")
    print("| tower (hidden_states[-2]) | phinano | Transformers |")
    print("| --- | --- | --- |")
    print(f"| one 336x336 crop | {crop_ours:.2f} s | {crop_theirs:.2f} s |")
    print(f"| {args.crops}-crop image ({args.crops + 1} crops with the global view) | {image_ours:.1f} s | "
          f"{image_theirs:.1f} s |")


if __name__ == "__main__":
    main()
