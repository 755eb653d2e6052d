"""Stage `synth`: the offline default data. A deterministic generator that writes the exact MVTec AD layout.

    <out>/<category>/train/good/NNN.png
    <out>/<category>/test/good/NNN.png
    <out>/<category>/test/<defect>/NNN.png
    <out>/<category>/ground_truth/<defect>/NNN_mask.png

One object category (a bottle seen from above) and one texture category, each with three defect types.
Defect size and contrast are drawn from continuous ranges, and good images carry the same nuisances as
defective ones (specks, lighting gradients, small shifts, grain), so no global image statistic separates
the classes: a model has to look at local structure. Every image depends only on (seed, category, class,
index), so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edgeqa.config import SynthCategory, SynthConfig
from edgeqa.io import atomic_dir, atomic_write_text, write_json
from edgeqa.report import md_table

log = logging.getLogger("edgeqa.synth")

TRAIN_GOOD_FRACTION = 0.5  # MVTec keeps good images in train/good and test/good; ingest re-splits anyway


@dataclass(frozen=True)
class Job:
    category: SynthCategory
    cat_index: int
    defect: str | None  # None = good
    type_index: int
    index: int
    subdir: str  # "train/good", "test/good" or "test/<defect>"


@dataclass(frozen=True)
class SynthReport:
    images: int
    defective: int
    seconds: float
    images_per_s: float
    per_class: dict[str, int]


# ----------------------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: random cells upsampled bicubically."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _background(cat: SynthCategory, rng: np.random.Generator, s: int,
                cfg: SynthConfig) -> tuple[np.ndarray, tuple[float, float, float]]:
    """An (s, s, 3) float image in 0..255 with per-image nuisances, and the object's (cy, cx, r) in px."""
    geom = (0.5 * s, 0.5 * s, 0.5 * s)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    grain = rng.uniform(0.4, 1.6) * 255 * cfg.noise_sigma
    if cat.kind == "texture":
        base = np.array([rng.uniform(150, 190), rng.uniform(135, 170), rng.uniform(110, 145)], np.float32)
        f = rng.uniform(18, 30)
        ph = rng.uniform(0, 2 * np.pi, 2)
        weave = 6.0 * np.sin(2 * np.pi * f * xx + ph[0]) * np.sin(2 * np.pi * f * yy + ph[1])
        lum = weave + 14.0 * _smooth_noise(rng, s, 6) + grain * rng.standard_normal((s, s)).astype(np.float32)
        img = base[None, None, :] + lum[..., None]
    else:  # object: a bottle seen from above, on a dark belt
        cy = 0.5 + rng.uniform(-cfg.max_shift, cfg.max_shift)
        cx = 0.5 + rng.uniform(-cfg.max_shift, cfg.max_shift)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        radius = rng.uniform(0.34, 0.40)
        geom = (cy * s, cx * s, radius * s)
        glass = np.array([rng.uniform(70, 110), rng.uniform(90, 130), rng.uniform(50, 80)], np.float32)
        belt = np.array([30, 30, 32], np.float32) + rng.uniform(-6, 6)
        inside = np.clip((radius - r) * s / 1.5, 0, 1)  # anti-aliased disc
        rim = np.exp(-(((r - radius * 0.86) * s / 3.0) ** 2)) * rng.uniform(60, 90)
        neck = np.exp(-((r / (radius * 0.28)) ** 2)) * rng.uniform(20, 45)
        shade = (1.0 - 0.5 * r / radius)
        body = glass[None, None, :] * shade[..., None] + (rim + neck)[..., None]
        img = inside[..., None] * body + (1 - inside[..., None]) * belt[None, None, :]
        img = img + (grain * rng.standard_normal((s, s)).astype(np.float32))[..., None]
        img = img + 8.0 * _smooth_noise(rng, s, 5)[..., None]
    # lighting gradient in a random direction
    g = rng.uniform(0, cfg.lighting_gradient) * 255
    theta = rng.uniform(0, 2 * np.pi)
    img = img + (g * ((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta)))[..., None]
    # global exposure jitter
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    # specks: tiny dots of either polarity, on good and defective images alike
    n_specks = rng.poisson(cfg.speck_rate)
    for _ in range(n_specks):
        y, x = rng.integers(2, s - 2, 2)
        rad = rng.uniform(0.6, 1.4)
        val = rng.choice([-1.0, 1.0]) * rng.uniform(20, 60)
        y0, y1, x0, x1 = y - 2, y + 3, x - 2, x + 3
        py, px = np.mgrid[y0:y1, x0:x1]
        w = np.clip(rad + 0.5 - np.sqrt((py - y) ** 2 + (px - x) ** 2), 0, 1)
        img[y0:y1, x0:x1] += (w * val)[..., None]
    return img, geom


def draw_defect(kind: str, surface: Literal["object", "texture"], rng: np.random.Generator, s: int,
                defect_scale: tuple[float, float], contrast_range: tuple[float, float],
                geom: tuple[float, float, float]) -> tuple[Image.Image, float, np.ndarray]:
    """One defect of shape `kind` (crack, scratch, contamination, stain, hole, broken) on an s x s image.
    `geom` (cy, cx, radius) is the object on an `object` surface; a `texture` defect may fall anywhere.
    Returns (soft mask 'L' image, signed intensity change, RGB tint direction)."""
    scale = rng.uniform(*defect_scale)
    contrast = rng.uniform(*contrast_range) * 255
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    margin = 0.12 * s
    if surface == "object":  # defects fall on the bottle
        cy, cx, rad = geom
        ang, rr = rng.uniform(0, 2 * np.pi), rad * np.sqrt(rng.uniform(0.02, 0.7))
        y0, x0 = cy + rr * np.sin(ang), cx + rr * np.cos(ang)
    else:
        y0, x0 = rng.uniform(margin, s - margin, 2)
    tint = np.ones(3, np.float32)
    sign = -1.0
    if kind in ("crack", "scratch"):
        length = scale * s * (2.5 if kind == "crack" else 3.5)
        heading = rng.uniform(0, np.pi)
        steps = 10
        pts = [(x0, y0)]
        for _ in range(steps):
            jitter = rng.normal(0, 0.5 if kind == "crack" else 0.08)
            heading += jitter
            x0 += np.cos(heading) * length / steps
            y0 += np.sin(heading) * length / steps
            pts.append((float(np.clip(x0, 1, s - 2)), float(np.clip(y0, 1, s - 2))))
        width = int(rng.integers(1, 3)) if kind == "crack" else 1
        d.line(pts, fill=255, width=width, joint="curve")
        sign = -1.0 if kind == "crack" else float(rng.choice([-1.0, 1.0]))
    elif kind in ("contamination", "stain"):
        r = max(2.0, 0.5 * scale * s)
        n = 12
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.6, 1.3, n) * np.array([1.0, rng.uniform(0.5, 1.0)] * (n // 2))
        pts = [(float(x0 + rr * np.cos(a)), float(y0 + rr * np.sin(a))) for a, rr in zip(angles, radii)]
        d.polygon(pts, fill=255)
        tint = np.array([rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4)], np.float32)
        sign = float(rng.choice([-1.0, 1.0])) if kind == "stain" else -1.0
    elif kind == "hole":
        r = max(1.5, 0.22 * scale * s)
        d.ellipse([x0 - r, y0 - r * rng.uniform(0.7, 1.0), x0 + r, y0 + r], fill=255)
        sign = -1.0
    elif kind == "broken":  # a chip out of the rim: the belt shows through
        cy, cx, rad = geom
        a = rng.uniform(0, 2 * np.pi)
        px, py = cx + rad * 0.92 * np.cos(a), cy + rad * 0.92 * np.sin(a)
        r = max(3.0, 0.6 * scale * s)
        pts = [(float(px + r * rng.uniform(0.6, 1.2) * np.cos(t)), float(py + r * rng.uniform(0.6, 1.2) * np.sin(t)))
               for t in np.linspace(0, 2 * np.pi, 9)[:-1]]
        d.polygon(pts, fill=255)
        sign = -1.0
    else:
        raise ValueError(f"unknown defect type {kind!r}")
    m = m.filter(ImageFilter.GaussianBlur(0.6))
    return m, sign * contrast, tint


def blend(img: np.ndarray, soft_img: Image.Image, delta: float, tint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A drawn defect blended into a float RGB image: (image, binary mask uint8 0/255, never empty)."""
    soft = np.asarray(soft_img, np.float32) / 255.0
    local = img * tint[None, None, :] + delta
    out = img * (1 - soft[..., None]) + local * soft[..., None]
    mask = np.where(soft >= 0.5, 255, 0).astype(np.uint8)
    if not mask.any():  # a sub-pixel defect: keep the strongest pixels so the mask is never empty
        mask = np.where(soft >= soft.max() * 0.5, 255, 0).astype(np.uint8)
    return out, mask


def render(job: Job, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one image (uint8 RGB) and its binary mask (uint8 0/255, or None for good)."""
    key = [cfg.seed, job.cat_index, job.type_index, job.index, 0 if job.subdir.startswith("train") else 1]
    rng = np.random.default_rng(key)
    s = cfg.image_size
    img, geom = _background(job.category, rng, s, cfg)
    mask_out = None
    if job.defect is not None:
        img, mask_out = blend(img, *draw_defect(job.defect, job.category.kind, rng, s, cfg.defect_scale,
                                                cfg.contrast, geom))
    return np.clip(img, 0, 255).astype(np.uint8), mask_out


def _jobs(cfg: SynthConfig) -> list[Job]:
    jobs: list[Job] = []
    for ci, cat in enumerate(cfg.categories):
        n_train = int(round(cfg.good_per_category * TRAIN_GOOD_FRACTION))
        for i in range(cfg.good_per_category):
            sub = "train/good" if i < n_train else "test/good"
            jobs.append(Job(cat, ci, None, 0, i, sub))
        for ti, t in enumerate(cat.defect_types, start=1):
            for i in range(cfg.defective_per_type):
                jobs.append(Job(cat, ci, t, ti, i, f"test/{t}"))
    return jobs


def _write(args: tuple[Job, SynthConfig, str]) -> None:
    job, cfg, root = args
    img, mask = render(job, cfg)
    base = Path(root) / job.category.name
    out = base / job.subdir / f"{job.index:03d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(out, compress_level=1)
    if mask is not None:
        mp = base / "ground_truth" / str(job.defect) / f"{job.index:03d}_mask.png"
        mp.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(mp, compress_level=1)


def run(cfg: SynthConfig, out: Path, metrics: Path | None = None, report: Path | None = None) -> SynthReport:
    """Generate the dataset into `out` (published atomically), and write metrics/report if given."""
    t0 = time.perf_counter()
    jobs = _jobs(cfg)
    with atomic_dir(out) as tmp:
        work = [(j, cfg, str(tmp)) for j in jobs]
        if cfg.workers > 1:
            with ProcessPoolExecutor(max_workers=cfg.workers) as ex:
                list(ex.map(_write, work, chunksize=8))
        else:
            for w in work:
                _write(w)
    dt = time.perf_counter() - t0
    per_class: dict[str, int] = {}
    for j in jobs:
        k = f"{j.category.name}/{j.defect or 'good'}"
        per_class[k] = per_class.get(k, 0) + 1
    rep = SynthReport(images=len(jobs), defective=sum(j.defect is not None for j in jobs), seconds=round(dt, 3),
                      images_per_s=round(len(jobs) / dt, 1), per_class=per_class)
    if metrics:
        write_json(metrics, {"images": rep.images, "defective": rep.defective, "seconds": rep.seconds,
                             "images_per_s": rep.images_per_s})
    if report:
        rows = [[k, v] for k, v in sorted(per_class.items())]
        atomic_write_text(report, f"# synth\n\n{rep.images} images ({rep.defective} defective) in "
                                  f"{rep.seconds:.1f} s ({rep.images_per_s} img/s), seed {cfg.seed}, "
                                  f"{cfg.image_size} px.\n\n" + md_table(["category/class", "images"], rows) + "\n")
    log.info("synth: %d images in %.1f s (%.0f img/s) -> %s", rep.images, dt, rep.images_per_s, out)
    return rep
