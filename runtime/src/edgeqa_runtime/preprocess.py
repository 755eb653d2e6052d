"""Image preprocessing, defined once for training and for the edge: RGB, bilinear resize to a square, scale to
[0, 1], ImageNet normalisation, channels first. numpy and Pillow only; the training side wraps the result in a
torch tensor, so both sides feed a model bit-identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resized(im: object, size: int) -> np.ndarray:
    from PIL import Image

    assert isinstance(im, Image.Image)
    return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32)


def normalise(batch: np.ndarray) -> np.ndarray:
    """(N, size, size, 3) float32 in 0..255 -> (N, 3, size, size) float32, ImageNet-normalised."""
    x = (batch / 255.0).transpose(0, 3, 1, 2)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray(((x - mean) / std).astype(np.float32))


def pixels(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Image files as model input (N, 3, size, size) float32; grayscale is replicated to three channels."""
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(_resized(im, size))
    return normalise(np.stack(arrs))


def pixels_from_arrays(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """`pixels` for in-memory images (uint8, HxW or HxWx3), resized the same way."""
    from PIL import Image

    return normalise(np.stack([_resized(Image.fromarray(a), size) for a in images]))
