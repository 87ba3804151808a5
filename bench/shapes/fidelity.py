"""Base fidelity of the shapes-world model: do generated images show what their captions say?

Held-out scenes (seed 1, never trained on) are captioned, generated with a fixed seed per
caption and read back with `scorers`. An image matches when its objects, as a multiset of
(colour, shape), equal the caption's. Three wordings: colours named per object (the base
number), colours left out (shapes must match), and "... in <colour>" for scenes whose objects
share a colour. It also scores VAE round trips of rendered scenes: the ceiling the decoder
sets on any generated image.

    python -m bench.shapes.fidelity --count 300 --grid bench/shapes/grid.png
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from .captions import caption
from .model import MODEL_DIR, load_pipeline
from .scorers import detect_objects, matches, validate
from .world import Record, sample_records

HELDOUT_SEED = 1  # training scenes use seed 0
GUIDANCE = 5.0
STEPS = 25


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    guidance: float = GUIDANCE,
    steps: int = STEPS,
    batch_size: int = 50,
) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images, prompt i drawn from `torch.Generator` seed `seed + i`
    (so an image does not depend on the batch it was drawn in)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
        output = pipe(
            prompt=batch,
            generator=generators,
            guidance_scale=guidance,
            num_inference_steps=steps,
            output_type="np",
        )
        images.append(np.rint(output.images * 255).astype(np.uint8))
    return np.concatenate(images)


@torch.no_grad()
def vae_round_trip(pipe, images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images encoded (posterior means) and decoded by the pipeline's VAE:
    the best any generated image can look."""
    out = []
    for chunk in np.array_split(images, max(1, len(images) // 250)):
        pixels = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mean).sample
        out.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def heldout(count: int, colour_phrase: bool = False) -> list[tuple[Record, str]]:
    """`count` held-out (record, caption) pairs; with `colour_phrase`, scenes whose objects
    share a colour, captioned "... in <colour>"."""
    if not colour_phrase:
        records = sample_records(count, HELDOUT_SEED)
        return [(record, caption(record, seed=i)) for i, record in enumerate(records)]
    rng = np.random.default_rng(HELDOUT_SEED)
    pairs = []
    for i, record in enumerate(sample_records(count, HELDOUT_SEED + 1)):
        colour = record.objects[int(rng.integers(len(record.objects)))].colour
        record = record.recoloured(colour)
        pairs.append((record, caption(record, seed=i, colour_phrase=colour)))
    return pairs


def score(images: np.ndarray, records: list[Record], colours: bool = True) -> dict:
    """Fidelity of images to records: the fraction of whole-scene matches ("match"), of
    images with the right number of objects ("count"), and, per colour and per shape, the
    fraction of the records' objects found in the image with that colour and shape."""
    attributes = ("colour", "shape") if colours else ("shape",)
    found: Counter = Counter()
    total: Counter = Counter()
    for image, record in zip(images, records, strict=True):
        detections = detect_objects(image)
        found["match"] += matches(image, record, attributes)
        found["count"] += len(detections) == len(record.objects)
        seen = Counter(tuple(getattr(d, a) for a in attributes) for d in detections)
        for obj in record.objects:
            key = tuple(getattr(obj, a) for a in attributes)
            hit = seen[key] > 0
            seen[key] -= hit
            for group in (obj.shape, obj.colour) if colours else (obj.shape,):
                found[group] += hit
                total[group] += 1
    report = {"images": len(records), "match": found["match"] / len(records)}
    report["count"] = found["count"] / len(records)
    report["objects found"] = {group: found[group] / total[group] for group in sorted(total)}
    return report


def grid(images: np.ndarray, columns: int, path: Path, scale: int = 3) -> None:
    """Save images as a grid, row-major, each upscaled `scale`× (nearest), 2-pixel gaps."""
    from PIL import Image

    rows = -(-len(images) // columns)
    side = images.shape[1] * scale + 2
    canvas = np.full((rows * side + 2, columns * side + 2, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // columns) * side + 2, (i % columns) * side + 2
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[top : top + big.shape[0], left : left + big.shape[1]] = big
    Image.fromarray(canvas).save(path)


def evaluate(pipe, count: int, guidance: float = GUIDANCE, steps: int = STEPS) -> dict:
    """Fidelity for the three wordings: `count` named-colour captions, `count // 3` each
    colourless and "in <colour>"."""
    results = {}
    named = heldout(count)
    plain = [
        (record, caption(record, seed=i, colours=False)) for i, (record, _) in enumerate(named)
    ]
    for name, pairs, colours in (
        ("colours named", named, True),
        ("colours left out", plain[: count // 3], False),
        ("in <colour>", heldout(count // 3, colour_phrase=True), True),
    ):
        records, prompts = zip(*pairs, strict=True)
        images = generate(pipe, list(prompts), guidance=guidance, steps=steps)
        results[name] = score(images, list(records), colours)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="base fidelity of the shapes-world model")
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--grid", type=Path, help="also save a captions × seeds picture grid")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see train.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    ceiling = validate(args.count, transform=lambda images: vae_round_trip(pipe, images))
    print(f"scorers on VAE round trips of rendered scenes: {ceiling}")
    for name, report in evaluate(pipe, args.count, args.guidance, args.steps).items():
        print(f"{name}: {report}")
    if args.grid:
        prompts = list(dict.fromkeys(prompt for _, prompt in heldout(12)))[:8]
        for row, prompt in enumerate(prompts):
            print(f"grid row {row + 1}: {prompt}")
        images = generate(pipe, [p for p in prompts for _ in range(6)], guidance=args.guidance)
        grid(images, 6, args.grid)


if __name__ == "__main__":
    main()
