"""A harder 10-class image set than digits for the benchmarks, generated in memory from a seed.

Each image is one of 5 shapes (disk, square, triangle, cross, ring) drawn with one of 2 fills
(solid, or stripes whose angle varies) — 10 classes — at a random centre, size and rotation,
brighter by a random amount than a random background that is itself textured (a low-frequency
blob field), then Gaussian pixel noise. Contrast is kept low, and the stripes of a small
shape are only a few pixels wide, so the classes overlap: ResNet-20 does not solve it the way it
solves digits, which leaves room to see whether a method recovers accuracy.

``shapes_data(seed)`` returns a ``PreparedData`` with a train/val/test split (balanced classes,
shuffled by the same seed), the same structure the pipeline's prepare stage writes.
"""

from __future__ import annotations

import numpy as np

from shrinkflow.data.prepared import PreparedData

SHAPES = ("disk", "square", "triangle", "cross", "ring")
FILLS = ("solid", "stripes")
CLASSES = [f"{shape}-{fill}" for shape in SHAPES for fill in FILLS]


def _mask(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Where ``shape`` lies in the rotated, centred coordinates (u, v)."""
    if shape == "disk":
        return u**2 + v**2 <= radius**2
    if shape == "square":
        return (np.abs(u) <= radius * 0.85) & (np.abs(v) <= radius * 0.85)
    if shape == "triangle":
        return (v >= -radius * 0.7) & (v <= radius * 0.9 - 1.6 * np.abs(u) * 0.9)
    if shape == "cross":
        arm = radius * 0.35
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | (
            (np.abs(v) <= arm) & (np.abs(u) <= radius)
        )
    ring = np.sqrt(u**2 + v**2)
    return (ring <= radius) & (ring >= radius * 0.55)


def render(label: int, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """One image of class ``label`` as float pixels in [0, 1]."""
    shape, fill = SHAPES[label // 2], FILLS[label % 2]
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    radius = rng.uniform(size * 0.22, size * 0.4)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    inside = _mask(shape, u, v, radius)
    if fill == "stripes":
        period = rng.uniform(3.0, 4.0)
        phase = rng.uniform(0, 2 * np.pi)
        stripe_angle = rng.uniform(0, np.pi)
        w = np.cos(stripe_angle) * x + np.sin(stripe_angle) * y
        inside &= np.sin(2 * np.pi * w / period + phase) > -0.2
    # A textured background: a few random low-frequency waves.
    background = rng.uniform(0.3, 0.7) + sum(
        rng.uniform(0.02, 0.05) * np.sin(rng.uniform(0.3, 1.2) * (x * k1 + y * k2) + p)
        for k1, k2, p in rng.uniform([-1, -1, 0], [1, 1, 2 * np.pi], (3, 3))
    )
    contrast = rng.uniform(0.25, 0.45)
    image = background + contrast * inside + rng.normal(0, noise, (size, size))
    return np.clip(image, 0.0, 1.0)


def shapes_data(
    seed: int = 0,
    size: int = 12,
    per_class: tuple[int, int, int] = (100, 40, 60),
    noise: float = 0.06,
) -> PreparedData:
    """``per_class`` (train, val, test) images of each class at ``size`` x ``size``, 1 channel."""
    rng = np.random.default_rng(seed)
    total = sum(per_class)
    labels = np.repeat(np.arange(len(CLASSES)), total)
    pixels = np.stack([render(int(k), size, rng, noise) for k in labels])
    images = np.round(pixels * 255).astype(np.uint8)[..., None]
    # Per class: the first per_class[0] images train, the next validate, the rest test.
    position = np.tile(np.arange(total), len(CLASSES))
    edges = np.cumsum(per_class)
    splits = [
        np.flatnonzero(position < edges[0]),
        np.flatnonzero((position >= edges[0]) & (position < edges[1])),
        np.flatnonzero(position >= edges[1]),
    ]
    train, val, test = (rng.permutation(s) for s in splits)
    train_pixels = images[train] / 255.0
    return PreparedData(
        images=images,
        labels=labels.astype(np.int64),
        train=train,
        val=val,
        test=test,
        classes=list(CLASSES),
        mean=(float(train_pixels.mean()),),
        std=(float(train_pixels.std()),),
        manifest={"fingerprint": f"shapes-{seed}-{size}-{per_class}-{noise}"},
    )
