"""Ground-truth facts measured from a defect mask, and the reference reason built from them.

These facts (location word, size class, regions, shape/orientation, polarity) are what later stages are
scored against, so they live in one place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgeqa.config import GRID_WORDS, MaskFactsConfig

_ROWS = ("upper", "middle", "lower")
_COLS = ("left", "center", "right")


def grid_word(cy: float, cx: float, height: int, width: int) -> str:
    """The 3x3 grid word for a point: 'upper left', 'top', ..., 'center', ..., 'lower right'."""
    r = min(2, max(0, int(3 * cy / height)))
    c = min(2, max(0, int(3 * cx / width)))
    return GRID_WORDS[3 * r + c]


@dataclass(frozen=True)
class MaskFacts:
    bbox_x0: int
    bbox_y0: int
    bbox_x1: int
    bbox_y1: int
    area_frac: float
    location: str
    size_class: str
    n_regions: int
    elongation: float
    shape: str  # compact | elongated
    orientation: str  # horizontal | vertical | diagonal | none
    polarity: str  # darker | brighter | similar

    def as_row(self) -> dict[str, object]:
        return asdict(self)


def mask_facts(mask: np.ndarray, gray: np.ndarray, cfg: MaskFactsConfig) -> MaskFacts | None:
    """Measure a binary mask (H, W) against its grayscale image (H, W). None if the mask is empty."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if m.shape != gray.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {gray.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return None
    h, w = m.shape
    area = ys.size / float(h * w)
    # Location: the centroid of the defect pixels.
    location = grid_word(float(ys.mean()) + 0.5, float(xs.mean()) + 0.5, h, w)
    size_class = next(name for name, upper in cfg.size_classes.items() if area <= upper)
    _, n_regions = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    # Shape from second moments of all defect pixels.
    if ys.size >= 3:
        cov = np.cov(np.stack([xs.astype(np.float64), ys.astype(np.float64)]))
        evals, evecs = np.linalg.eigh(cov)
        lo, hi = max(float(evals[0]), 1.0 / 12.0), max(float(evals[1]), 1.0 / 12.0)
        elongation = math.sqrt(hi / lo)
        vx, vy = evecs[:, 1]
        angle = abs(math.degrees(math.atan2(vy, vx))) % 180.0
        angle = min(angle, 180.0 - angle)  # 0 = horizontal, 90 = vertical
    else:
        elongation, angle = 1.0, 0.0
    if elongation >= cfg.elongated_ratio:
        shape = "elongated"
        orientation = "horizontal" if angle < 22.5 else "vertical" if angle > 67.5 else "diagonal"
    else:
        shape, orientation = "compact", "none"
    # Polarity: mean gray inside the mask against a ring just outside it.
    k = max(3, int(round(0.03 * min(h, w))) | 1)
    ring = ndimage.maximum_filter(m.astype(np.uint8), size=k).astype(bool) & ~m
    inside = float(gray[m].mean())
    outside = float(gray[ring].mean()) if ring.any() else float(gray[~m].mean()) if (~m).any() else inside
    delta = inside - outside
    polarity = "similar" if abs(delta) < cfg.polarity_min_delta else ("darker" if delta < 0 else "brighter")
    return MaskFacts(
        bbox_x0=int(xs.min()), bbox_y0=int(ys.min()), bbox_x1=int(xs.max()) + 1, bbox_y1=int(ys.max()) + 1,
        area_frac=round(area, 6), location=location, size_class=size_class, n_regions=int(n_regions),
        elongation=round(elongation, 3), shape=shape, orientation=orientation, polarity=polarity,
    )


def _type_phrase(defect_type: str | None) -> str:
    return (defect_type or "defect").replace("_", " ")


def reference_reason(label: str, defect_type: str | None, facts: MaskFacts | None,
                     known_types: list[str] | None = None) -> str:
    """A reference reason sentence built only from ground-truth facts.

    Defective with a mask: size, shape and orientation, type, location, polarity and region count, so the
    reason carries more than the type and location. Without a mask (or types), only what is known.
    """
    if label == "good":
        if known_types:
            names = [_type_phrase(t) for t in known_types]
            listed = ", ".join(names[:-1]) + (f" or {names[-1]}" if len(names) > 1 else names[0])
            return f"no defect is visible: the surface is even and intact, with no {listed}"
        return "no defect is visible: the surface is even and intact"
    kind = _type_phrase(defect_type)
    if facts is None:
        return f"{kind} defect: visible on the surface" if defect_type else "defect: visible on the surface"
    if facts.shape == "elongated":
        form = f"{facts.size_class}, elongated and running {facts.orientation}ly"
    else:
        form = f"{facts.size_class} and compact"
    regions = "one region" if facts.n_regions == 1 else f"{facts.n_regions} regions"
    tone = {"darker": "darker than", "brighter": "brighter than", "similar": "similar in tone to"}[facts.polarity]
    return (f"{kind} defect: {form}, in the {facts.location} region, {tone} the surrounding surface, "
            f"{regions} covering {100 * facts.area_frac:.1f}% of the image")
