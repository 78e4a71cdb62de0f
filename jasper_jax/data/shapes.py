"""Synthetic captioned images for the embedded default's stage 4: shapes on a plain background.

Each scene holds 1-2 groups of objects; a group is one (shape, colour, size) drawn `count` times
(1-3) in distinct cells of a 3 x 3 grid. Captions name every group's count, size, colour and
shape, and its position when it is a single object ("a small red circle at the top left"),
through varied templates and group orders, so no caption wording is tied to an image.

Generalisation check: the (colour, shape) pairs in `UNSEEN_PAIRS` never occur in the train
split; about half of the held-out images contain at least one of them.

Everything is a pure function of (seed, split, index): example i does not depend on how many
examples are drawn, so a bigger dataset extends a smaller one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SIZES = {"small": 0.08, "large": 0.15}  # half-width as a fraction of the image side
CELLS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
UNSEEN_PAIRS = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "diamond")}
)
SPLITS = {"train": 0, "validation": 1}
NUMBERS = ("no", "one", "two", "three")
TEMPLATES = (
    "{}.",
    "a picture of {}.",
    "an image showing {}.",
    "the scene contains {}.",
    "a simple drawing with {}.",
    "{} drawn on a light background.",
)


@dataclasses.dataclass(frozen=True)
class Group:
    """`count` copies of one (shape, colour, size), in grid cells `cells` (indices into CELLS)."""

    shape: str
    colour: str
    size: str
    cells: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.cells)

    @property
    def unseen(self) -> bool:
        return (self.colour, self.shape) in UNSEEN_PAIRS


@dataclasses.dataclass(frozen=True)
class ShapeExample:
    """image: uint8 [size, size, 3]; caption: str; unseen: holds a pair absent from train."""

    image: np.ndarray
    caption: str
    groups: tuple[Group, ...]

    @property
    def unseen(self) -> bool:
        return any(g.unseen for g in self.groups)


def _pair_allowed(colour: str, shape: str, split: str) -> bool:
    return split != "train" or (colour, shape) not in UNSEEN_PAIRS


def sample_groups(rng: np.random.Generator, split: str) -> tuple[Group, ...]:
    """1-2 groups with distinct (shape, colour), 1-3 objects each, at most 3 objects in all.

    In the validation split half the scenes are forced to contain an unseen pair.
    """
    want_unseen = split != "train" and rng.random() < 0.5
    num_groups = int(rng.integers(1, 3))
    free = list(rng.permutation(len(CELLS)))
    groups, used, objects_left = [], set(), 3
    for g in range(num_groups):
        pairs = [
            (c, s)
            for c in COLOURS
            for s in SHAPES
            if (c, s) not in used and _pair_allowed(c, s, split)
        ]
        if want_unseen and g == 0:
            pairs = sorted(UNSEEN_PAIRS)
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        max_count = min(3, objects_left - (num_groups - g - 1))
        count = int(rng.integers(1, max_count + 1))
        cells = tuple(sorted(int(free.pop()) for _ in range(count)))
        size = ("small", "large")[int(rng.integers(2))]
        groups.append(Group(shape, colour, size, cells))
        used.add((colour, shape))
        objects_left -= count
    return tuple(groups)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def render(groups: tuple[Group, ...], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [image_size, image_size, 3]: a light background, each object jittered in its cell
    (objects never overlap: a large one spans 0.9 of a cell)."""
    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for group in groups:
        r = SIZES[group.size] * image_size
        colour = tuple(
            int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[group.colour]
        )
        for index in group.cells:
            jitter = rng.uniform(-0.08, 0.08, size=2) * cell
            cx = (index % 3 + 0.5) * cell + jitter[0]
            cy = (index // 3 + 0.5) * cell + jitter[1]
            if group.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.polygon(_polygon(group.shape, cx, cy, r), fill=colour)
    return np.asarray(image, dtype=np.uint8)


def describe_group(group: Group) -> str:
    """'a small red circle at the top left' / 'two large blue squares'."""
    if group.count == 1:
        where = CELLS[group.cells[0]]
        where = "in the centre" if where == "centre" else f"at the {where}"
        return f"a {group.size} {group.colour} {group.shape} {where}"
    return f"{NUMBERS[group.count]} {group.size} {group.colour} {group.shape}s"


def caption(groups: tuple[Group, ...], rng: np.random.Generator) -> str:
    """A caption naming every group, groups in random order, through a random template."""
    parts = [describe_group(groups[i]) for i in rng.permutation(len(groups))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(listed)


def make_example(seed: int, split: str, index: int, image_size: int = 64) -> ShapeExample:
    """Example `index` of `split`; a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    groups = sample_groups(rng, split)
    return ShapeExample(render(groups, image_size, rng), caption(groups, rng), groups)


def generate(split: str, count: int, seed: int = 0, image_size: int = 64) -> list[ShapeExample]:
    """Examples 0..count-1 of `split`."""
    return [make_example(seed, split, i, image_size) for i in range(count)]
