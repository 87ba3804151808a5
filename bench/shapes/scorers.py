"""Read a shapes-world image back: its objects (shape, colour, size, position) and background.

No learned weights. Objects are saturated and backgrounds are grey, so an object is a
4-connected blob of pixels whose chroma (max − min channel) exceeds 60 (about half an
object's chroma, hence half-covered edge pixels); blobs under 10 pixels are noise. Colour: the
nearest hue among `world.COLOURS`. Shape: the template (each shape, both sizes, three
sub-pixel offsets, rendered by `world`) whose mask, cropped to its box and resampled to 12×12,
overlaps the blob's most (IoU). Size: the box side, split at 10.5 pixels. Background: the
grey level of the pixels away from objects: plain if nearly uniform (then black, grey or white
by level), else striped if the mean difference between neighbours is far smaller along one of
four directions than along another, else mottled.

Run `python -m bench.shapes.scorers` for accuracies on rendered ground truth.
"""

from __future__ import annotations

import argparse
import colorsys
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .world import (
    COLOURS,
    SHAPES,
    SIZES,
    Record,
    SceneObject,
    coverage,
    render_many,
    sample_records,
)

OBJECT_CHROMA = 60
MIN_PIXELS = 10
SIZE_SPLIT = 10.5
TEMPLATE_SIDE = 12
FLAT = 8.0  # grey-level standard deviation below which a background is plain
STRIPES = 0.2  # flattest / roughest direction below which a texture is striped


@dataclass(frozen=True)
class Detection:
    """One object found in an image; (x, y) is its box centre in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    pixels: int


def _hue(rgb: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*(rgb / 255.0))[0] * 360.0


_HUES = {name: _hue(np.array(rgb, dtype=float)) for name, rgb in COLOURS.items()}


def classify_colour(pixels: np.ndarray) -> str:
    """The colour name whose hue is nearest the median of (n, 3) RGB pixels."""
    hue = _hue(np.median(pixels.astype(float), axis=0))
    distance = {name: min(abs(hue - h), 360 - abs(hue - h)) for name, h in _HUES.items()}
    return min(distance, key=distance.get)


def _span(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (start, length) of a 1-D coverage profile: length its sum, centred on its
    weighted mean (no threshold, so no flips at half-covered edges)."""
    length = float(profile.sum())
    centre = float((profile * (np.arange(len(profile)) + 0.5)).sum()) / length
    return centre - length / 2, length


def _normalised(soft: np.ndarray) -> torch.Tensor:
    """A soft mask (values in [0, 1]) resampled to 12×12 over its sub-pixel box."""
    (top, height), (left, width) = _span(soft.max(axis=1)), _span(soft.max(axis=0))
    steps = (torch.arange(TEMPLATE_SIDE) + 0.5) / TEMPLATE_SIDE
    y = (top + steps * height) * 2 / soft.shape[0] - 1  # grid_sample's [-1, 1] coordinates
    x = (left + steps * width) * 2 / soft.shape[1] - 1
    grid = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)[None].float()
    tensor = torch.from_numpy(soft.astype(np.float32))[None, None]
    return F.grid_sample(tensor, grid, mode="bilinear", align_corners=False)[0, 0]


@functools.cache
def _templates() -> list[tuple[str, torch.Tensor]]:
    offsets = (0.0, 0.25, 0.5, 0.75)
    return [
        (shape, _normalised(coverage(SceneObject(shape, "red", size, 16 + dx, 16 + dy))))
        for shape in SHAPES
        for size in SIZES
        for dx in offsets
        for dy in offsets
    ]


def classify_shape(soft: np.ndarray) -> str:
    """The shape whose template overlaps the blob most (soft IoU); `soft` is the blob's
    (32, 32) coverage, e.g. its chroma over the blob's typical chroma, clipped to [0, 1]."""
    blob = _normalised(soft)

    def overlap(template: torch.Tensor) -> float:
        return (torch.minimum(blob, template).sum() / torch.maximum(blob, template).sum()).item()

    return max(_templates(), key=lambda item: overlap(item[1]))[0]


def _chroma(image: np.ndarray) -> np.ndarray:
    channels = image.astype(np.float32)
    return channels.max(axis=2) - channels.min(axis=2)


def object_mask(image: np.ndarray) -> np.ndarray:
    """(32, 32) bool: pixels of (32, 32, 3) uint8 `image` saturated enough to be objects."""
    return _chroma(image) > OBJECT_CHROMA


def _blobs(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool mask, each as a bool mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    blobs = []
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        labels[start] = len(blobs) + 1
        stack = [start]
        while stack:
            row, col = stack.pop()
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                inside = 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]
                if inside and mask[r, c] and not labels[r, c]:
                    labels[r, c] = labels[start]
                    stack.append((r, c))
        blobs.append(labels == labels[start])
    return blobs


def detect_objects(image: np.ndarray) -> list[Detection]:
    """The objects of a (32, 32, 3) uint8 image, largest first."""
    chroma, detections = _chroma(image), []
    for blob in _blobs(chroma > OBJECT_CHROMA):
        if blob.sum() < MIN_PIXELS:
            continue
        grown = F.max_pool2d(torch.from_numpy(blob[None].astype(np.float32)), 3, 1, 1)[0]
        soft = np.clip(chroma / np.median(chroma[blob]), 0, 1) * grown.numpy()
        rows, cols = np.nonzero(blob)
        side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        detections.append(
            Detection(
                shape=classify_shape(soft),
                colour=classify_colour(image[blob]),
                size="small" if side < SIZE_SPLIT else "large",
                x=(cols.min() + cols.max() + 1) / 2,
                y=(rows.min() + rows.max() + 1) / 2,
                pixels=int(blob.sum()),
            )
        )
    return sorted(detections, key=lambda d: -d.pixels)


def _pairs(array: np.ndarray, dy: int, dx: int) -> tuple[np.ndarray, np.ndarray]:
    """Views a, b with b[i, j] = array at (i + dy, j + dx) of a's pixel, for dy ≥ 0."""
    height, width = array.shape
    a = array[: height - dy, max(0, -dx) : width - max(0, dx)]
    b = array[dy:, max(0, dx) : width - max(0, -dx)]
    return a, b


def detect_background(image: np.ndarray) -> str:
    """The background's name (one of `world.BACKGROUNDS`), read from the pixels at least 2 away
    from objects."""
    grey = image.astype(np.float32).mean(axis=2)
    near = torch.from_numpy(object_mask(image).astype(np.float32))[None, None]
    free = (F.max_pool2d(near, 5, stride=1, padding=2)[0, 0] == 0).numpy()
    if not free.any():  # objects everywhere: judge the whole image
        free = np.ones_like(free)
    if grey[free].std() < FLAT:
        level = float(grey[free].mean())
        return "black" if level < 70 else "white" if level > 185 else "grey"
    roughness = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, b = _pairs(grey, dy, dx)
        both = np.logical_and(*_pairs(free, dy, dx))
        roughness.append(float(np.abs(a - b)[both].mean()) if both.any() else 0.0)
    return "striped" if min(roughness) < STRIPES * max(roughness) else "mottled"


def matches(
    image: np.ndarray, record: Record, attributes: tuple[str, ...] = ("colour", "shape")
) -> bool:
    """Whether the image's objects are the record's, compared as multisets of `attributes`."""

    def key(objects: list[Detection] | tuple[SceneObject, ...]) -> Counter:
        return Counter(tuple(getattr(o, name) for name in attributes) for o in objects)

    return key(detect_objects(image)) == key(record.objects)


def colour_share(images: np.ndarray, colour: str) -> float:
    """Fraction of all objects detected in (N, 32, 32, 3) images that are `colour` (0 if none
    is found): how far a style such as "in red" took hold."""
    colours = [d.colour for image in images for d in detect_objects(image)]
    return colours.count(colour) / len(colours) if colours else 0.0


def shape_rate(images: np.ndarray, shape: str) -> float:
    """Fraction of (N, 32, 32, 3) images showing at least one `shape`: how often a concept
    appears (for negation, lower is better)."""
    return float(np.mean([any(d.shape == shape for d in detect_objects(i)) for i in images]))


def validate(
    count: int = 2000,
    seed: int = 12345,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Accuracies on rendered scenes (passed through `transform`, e.g. a VAE round trip, if
    given): object count, then colour, shape and size of each true object (paired with the
    detection nearest its centre), background, and whole scene (colour, shape and size)."""
    records = sample_records(count, seed)
    images = render_many(records)
    if transform is not None:
        images = transform(images)
    hits: Counter = Counter()
    objects = 0
    for image, record in zip(images, records, strict=True):
        found = detect_objects(image)
        hits["count"] += len(found) == len(record.objects)
        hits["background"] += detect_background(image) == record.background
        hits["scene"] += matches(image, record, ("colour", "shape", "size"))
        for truth in record.objects:
            objects += 1
            if not found:
                continue
            nearest = min(found, key=lambda d: (d.x - truth.x) ** 2 + (d.y - truth.y) ** 2)
            for name in ("colour", "shape", "size"):
                hits[name] += getattr(nearest, name) == getattr(truth, name)
    per_image = ("count", "background", "scene")
    names = (*per_image, "colour", "shape", "size")
    return {name: hits[name] / (count if name in per_image else objects) for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description="scorer accuracies on rendered scenes")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    for name, accuracy in validate(args.count, args.seed).items():
        print(f"{name:>10}: {accuracy:.2%}")


if __name__ == "__main__":
    main()
