"""The synthetic shapes world: seeded scene records and their 32×32 RGB renderings.

A scene holds one or two non-overlapping objects (a shape, a colour, a size and a centre) on a
neutral background: plain grey, white or black, or a grey texture (stripes, or mottled: coarse
noise, so that an 8×8 latent can carry it). Object
colours are saturated and backgrounds are not, which is what the scorers rely on. Everything
is drawn with numpy (4× supersampled, so edges are antialiased) and is a pure function of the
record: `render(record)` always gives the same pixels. Captions live in `captions.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 135, 30),
}
SIZES: dict[str, float] = {"small": 8.0, "large": 13.0}  # side of the bounding box, pixels
PLAIN_BACKGROUNDS: dict[str, float] = {"grey": 128.0, "white": 238.0, "black": 22.0}
TEXTURED_BACKGROUNDS = ("striped", "mottled")
BACKGROUNDS = (*PLAIN_BACKGROUNDS, *TEXTURED_BACKGROUNDS)

_SUPERSAMPLE = 4
_GAP = 2.0  # least distance between two objects' bounding boxes, pixels
_COLOUR_JITTER = 12  # per channel, uniform in ±this
_BRIGHTNESS_JITTER = 12.0
_MOTTLE = 4  # cells per side of the mottled background's noise


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; (x, y) is the centre of its bounding box in pixels."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def extent(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Record:
    """Ground truth of one image. `seed` fixes the texture and the colour jitter."""

    objects: tuple[SceneObject, ...]
    background: str
    seed: int

    def without(self, shape: str) -> Record:
        """The same scene with every object of `shape` removed."""
        return replace(self, objects=tuple(o for o in self.objects if o.shape != shape))

    def recoloured(self, colour: str) -> Record:
        """The same scene with every object painted `colour`."""
        return replace(self, objects=tuple(replace(o, colour=colour) for o in self.objects))


def _check(name: str, value: str, allowed: tuple[str, ...] | dict) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def _overlaps(a: SceneObject, b: SceneObject) -> bool:
    reach = (a.extent + b.extent) / 2 + _GAP
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def _place(
    rng: np.random.Generator, attributes: list[tuple[str, str, str]]
) -> tuple[SceneObject, ...]:
    """Objects at uniform positions with a 2-pixel gap between them (all positions re-drawn
    until they have it: two large objects fit only near opposite sides)."""
    while True:
        placed = []
        for shape, colour, size in attributes:
            half = SIZES[size] / 2 + 1.0
            x, y = rng.uniform(half, IMAGE_SIZE - half, size=2)
            placed.append(SceneObject(shape, colour, size, float(x), float(y)))
        if not any(_overlaps(a, b) for i, a in enumerate(placed) for b in placed[i + 1 :]):
            return tuple(placed)


def sample_record(
    rng: np.random.Generator,
    objects: int | None = None,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
    backgrounds: tuple[str, ...] = BACKGROUNDS,
) -> Record:
    """Draw one scene: 1 object (40%) or 2 (60%) unless `objects` is given; shape, colour,
    size and background uniform over the allowed values, positions uniform."""
    count = objects if objects is not None else (1 if rng.random() < 0.4 else 2)
    if count not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, got {count}")
    attributes = [
        (
            shapes[rng.integers(len(shapes))],
            colours[rng.integers(len(colours))],
            tuple(SIZES)[rng.integers(len(SIZES))],
        )
        for _ in range(count)
    ]
    objects_placed = _place(rng, attributes)
    background = backgrounds[rng.integers(len(backgrounds))]
    return Record(objects_placed, background, int(rng.integers(2**31)))


def sample_records(count: int, seed: int, **constraints) -> list[Record]:
    """`count` scenes from one seed (`constraints` as for `sample_record`)."""
    rng = np.random.default_rng(seed)
    return [sample_record(rng, **constraints) for _ in range(count)]


def coverage(obj: SceneObject) -> np.ndarray:
    """(32, 32) fraction of each pixel inside the object."""
    coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    half = obj.extent / 2
    top, left = int(obj.y - half), int(obj.x - half)  # the box holding the object's pixels
    side = int(obj.extent) + 2
    fine = (np.arange(side * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    dy, dx = np.meshgrid(top + fine - obj.y, left + fine - obj.x, indexing="ij")
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif obj.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif obj.shape == "triangle":  # apex up, base as wide as the triangle is tall
        inside = (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; choose one of {', '.join(SHAPES)}")
    box = inside.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(axis=(1, 3))
    rows, cols = slice(top, top + side), slice(left, left + side)
    coverage[rows, cols] = box[: IMAGE_SIZE - top, : IMAGE_SIZE - left]
    return coverage


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    """(32, 32) grey levels of a background."""
    _check("background", name, BACKGROUNDS)
    shade = rng.uniform(-_BRIGHTNESS_JITTER, _BRIGHTNESS_JITTER)
    if name in PLAIN_BACKGROUNDS:
        return np.full((IMAGE_SIZE, IMAGE_SIZE), PLAIN_BACKGROUNDS[name] + shade)
    if name == "mottled":  # 4×4 noise, bilinearly upsampled
        coarse = rng.normal(0.0, 40.0, (_MOTTLE, _MOTTLE))
        cell = IMAGE_SIZE / _MOTTLE
        axis = np.clip((np.arange(IMAGE_SIZE) + 0.5) / cell - 0.5, 0, _MOTTLE - 1)
        low = np.minimum(axis.astype(int), _MOTTLE - 2)
        frac = axis - low
        rows = coarse[low] * (1 - frac)[:, None] + coarse[low + 1] * frac[:, None]
        fine = rows[:, low] * (1 - frac) + rows[:, low + 1] * frac
        return 128.0 + shade + fine
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    direction = (y, x, x + y, x - y)[rng.integers(4)]  # horizontal, vertical or diagonal
    width = int(rng.integers(2, 5))
    return np.where((direction // width) % 2 == 0, 92.0, 168.0) + shade


def render(record: Record) -> np.ndarray:
    """(32, 32, 3) uint8 image of a record."""
    rng = np.random.default_rng(record.seed)
    image = np.repeat(_background(record.background, rng)[..., None], 3, axis=2)
    for obj in record.objects:
        _check("colour", obj.colour, COLOURS)
        _check("size", obj.size, SIZES)
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
        colour = np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255)
        alpha = coverage(obj)[..., None]
        image = (1 - alpha) * image + alpha * colour
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_many(records: list[Record]) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images of records."""
    return np.stack([render(record) for record in records])
