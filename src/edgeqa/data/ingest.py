"""Stage `ingest`: read a dataset through an adapter and write one manifest row per image (parquet).

Adapters (params `ingest.adapter`):
- `mvtec`: `CAT/train/good`, `CAT/test/<class>`, `CAT/ground_truth/<class>/<stem>_mask.png`.
- `magnetic_tile`: `MT_<Class>/Imgs/<stem>.jpg` plus a same-stem `.png` mask; `Free` is good.
- `folder`: `root/<class>/*.{png,jpg,bmp}`, good class named in params, optional `mask_dir/<class>/`.

Every problem found (unknown class folder, unpaired mask, missing mask, corrupt image, bad mode or size)
is collected and reported by file; the manifest is written only when there are none.
Splits are fixed: within each (category, class), images are ordered by sha1 of their path relative to the
dataset root and cut at the configured fractions.

Reviewed images (`edgeqa review` batches under `ingest.reviews`, see edgeqa.data.review) are added after the
cut, always to `labelled`, with `source` = review; the dataset's own images keep their splits. A reviewed
image whose content is already in the dataset is left out (the dataset's answer and split stand) and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from edgeqa.errors import StageError
from edgeqa.io import atomic_write_bytes, atomic_write_text, sha256_file, write_json
from edgeqa.report import md_table
from edgeqa.config import SPLITS, IngestConfig, load_params
from edgeqa.data.manifest import COLUMNS, MASK_FACT_COLUMNS, REVIEW_FILE, REVIEW_IMAGES
from edgeqa.data.maskfacts import mask_facts, reference_reason

log = logging.getLogger("edgeqa.ingest")
MAX_ERRORS_SHOWN = 25


@dataclass(frozen=True)
class Sample:
    path: Path
    relpath: str
    category: str
    cls: str  # the defect type; "" for good images and for datasets without types
    label: str
    mask: Path | None


@dataclass(frozen=True)
class IngestReport:
    images: int
    defective: int
    has_masks: bool
    has_types: bool
    seconds: float
    per_split: dict[str, int]
    reviewed: int = 0
    reviewed_duplicates: int = 0


class _Errors(list[str]):
    def add(self, path: Path | str, problem: str) -> None:
        self.append(f"{path}: {problem}")


def _images_in(folder: Path, exts: Iterable[str]) -> list[Path]:
    exts = set(exts)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _orphan_masks(mask_root: Path, image_root: Path, suffix: str, cfg: IngestConfig, errors: _Errors) -> None:
    """Every mask in mask_root/<class>/ must pair, by stem, with an image in image_root/<class>/."""
    for cls_dir in _subdirs(mask_root):
        img_dir = image_root / cls_dir.name
        stems = {p.stem for p in _images_in(img_dir, cfg.image_exts)} if img_dir.is_dir() else set()
        for m in sorted(cls_dir.glob("*.png")):
            stem = m.stem.removesuffix(suffix) if suffix else m.stem
            if stem not in stems:
                errors.add(m, f"mask without image (no {img_dir}/{stem}.* image)")


def _class_of(name: str, cfg: IngestConfig, where: Path, errors: _Errors) -> tuple[str, str] | None:
    """Map a class folder name to (label, defect_type); report an unknown class by its folder."""
    if name == cfg.good_class:
        return "good", ""
    if cfg.defect_types is None:
        return "defective", ""
    if name in cfg.defect_types:
        return "defective", name
    errors.add(where, f"unknown class folder {name!r}; allowed: {[cfg.good_class, *cfg.defect_types]}")
    return None


def scan_mvtec(root: Path, cfg: IngestConfig, errors: _Errors) -> list[Sample]:
    samples: list[Sample] = []
    cats = _subdirs(root)
    if not cats:
        errors.add(root, "no category folders; the mvtec layout is CAT/train/good, CAT/test/<class>, CAT/ground_truth")
    for cat in cats:
        gt = cat / "ground_truth"
        has_gt = gt.is_dir()
        for sub in _subdirs(cat):
            if sub.name not in ("train", "test", "ground_truth"):
                errors.add(sub, "unknown folder; allowed in a category: train, test, ground_truth")
        if not (cat / "train").is_dir() and not (cat / "test").is_dir():
            errors.add(cat, "category without train/ or test/ folder")
        for split_dir in (cat / "train", cat / "test"):
            if not split_dir.is_dir():
                continue
            for cls_dir in _subdirs(split_dir):
                if split_dir.name == "train" and cls_dir.name != cfg.good_class:
                    errors.add(cls_dir, f"train/ may only hold {cfg.good_class!r} images in the mvtec layout")
                    continue
                mapped = _class_of(cls_dir.name, cfg, cls_dir, errors)
                if mapped is None:
                    continue
                label, dtype = mapped
                for img in _images_in(cls_dir, cfg.image_exts):
                    mask = None
                    if label == "defective" and has_gt:
                        mask = gt / cls_dir.name / f"{img.stem}_mask.png"
                        if not mask.is_file():
                            errors.add(img, f"defective image without its mask (expected {mask})")
                            continue
                    samples.append(Sample(img, img.relative_to(root).as_posix(), cat.name, dtype, label, mask))
        if has_gt:
            _orphan_masks(gt, cat / "test", "_mask", cfg, errors)
    return samples


def scan_magnetic_tile(root: Path, cfg: IngestConfig, errors: _Errors) -> list[Sample]:
    samples: list[Sample] = []
    dirs = _subdirs(root)
    if not dirs:
        errors.add(root, "no MT_<Class> folders")
    category = cfg.category or "magnetic_tile"
    for d in dirs:
        if not d.name.startswith("MT_"):
            errors.add(d, "unknown folder; the magnetic-tile layout is MT_<Class>/Imgs/<stem>.jpg + <stem>.png")
            continue
        name = d.name[3:].lower()
        mapped = _class_of(name, cfg, d, errors)
        if mapped is None:
            continue
        label, dtype = mapped
        imgs_dir = d / "Imgs"
        if not imgs_dir.is_dir():
            errors.add(d, "missing Imgs/ folder")
            continue
        jpgs = {p.stem: p for p in imgs_dir.glob("*.jpg")}
        pngs = {p.stem: p for p in imgs_dir.glob("*.png")}
        for stem in sorted(set(pngs) - set(jpgs)):
            errors.add(pngs[stem], "mask without image (no same-stem .jpg)")
        for stem in sorted(jpgs):
            img = jpgs[stem]
            mask = pngs.get(stem)
            if label == "defective" and mask is None:
                errors.add(img, "defective image without its mask (expected a same-stem .png)")
                continue
            samples.append(Sample(img, img.relative_to(root).as_posix(), category, dtype, label,
                                  mask if label == "defective" else None))
    return samples


def scan_folder(root: Path, cfg: IngestConfig, errors: _Errors) -> list[Sample]:
    samples: list[Sample] = []
    category = cfg.category or root.name
    mask_root = Path(cfg.mask_dir) if cfg.mask_dir else None
    dirs = _subdirs(root)
    if not dirs:
        errors.add(root, "no class folders; the folder layout is root/<class>/*.png")
    for d in dirs:
        if mask_root is not None and d.resolve() == mask_root.resolve():
            continue
        mapped = _class_of(d.name, cfg, d, errors)
        if mapped is None:
            continue
        label, dtype = mapped
        for img in _images_in(d, cfg.image_exts):
            mask = None
            if label == "defective" and mask_root is not None:
                mask = mask_root / d.name / f"{img.stem}{cfg.mask_suffix}.png"
                if not mask.is_file():
                    errors.add(img, f"defective image without its mask (expected {mask})")
                    continue
            samples.append(Sample(img, img.relative_to(root).as_posix(), category, dtype, label, mask))
    if mask_root is not None and mask_root.is_dir():
        _orphan_masks(mask_root, root, cfg.mask_suffix, cfg, errors)
    return samples


ADAPTERS = {"mvtec": scan_mvtec, "magnetic_tile": scan_magnetic_tile, "folder": scan_folder}


def review_batches(reviews: Path) -> list[Path]:
    """The review batch folders under `reviews`, oldest first (batch names start with their UTC time)."""
    return sorted(p for p in _subdirs(reviews) if (p / REVIEW_FILE).is_file()) if reviews.is_dir() else []


def scan_reviews(reviews: Path, cfg: IngestConfig, errors: _Errors) -> list[Sample]:
    """The reviewed images of this dataset (`dataset` column == ingest.dataset), as samples with relpath
    `reviews/<batch>/<file>`. A batch's image must still hash to what the review recorded."""
    samples: list[Sample] = []
    if not reviews.is_dir():
        return samples
    for dvc_file in sorted(reviews.glob("*.dvc")):
        if not (reviews / dvc_file.stem).is_dir():
            errors.add(dvc_file, f"review batch {dvc_file.stem} is tracked but not in the workspace; "
                                 f"`dvc pull {dvc_file}` fetches it")
    for batch in review_batches(reviews):
        table = batch / REVIEW_FILE
        try:
            df = pd.read_csv(table, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            errors.add(table, f"unreadable review table ({exc})")
            continue
        missing = {"file", "sha256", "dataset", "category", "verdict", "defect_type"} - set(df.columns)
        if missing:
            errors.add(table, f"review table without the columns {sorted(missing)}")
            continue
        for i, r in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
            if r.dataset != cfg.dataset:
                continue
            where = f"{table} line {i}"
            path = batch / REVIEW_IMAGES / r.file
            if not path.is_file():
                errors.add(where, f"reviewed image {path} is missing")
                continue
            if sha256_file(path) != r.sha256:
                errors.add(path, f"content differs from the sha256 its review recorded ({where}); a reviewed "
                                 "image is never edited: review the new image again")
                continue
            if r.verdict == "good":
                label, dtype = "good", ""
            elif r.verdict == "defective":
                label, dtype = "defective", r.defect_type
                if cfg.defect_types is not None and dtype not in cfg.defect_types:
                    errors.add(where, f"defect_type {dtype!r} is not one of ingest.defect_types {cfg.defect_types}")
                    continue
                if cfg.defect_types is None:
                    dtype = ""
            else:
                errors.add(where, f"verdict {r.verdict!r}; allowed: good, defective")
                continue
            samples.append(Sample(path, f"reviews/{batch.name}/{r.file}", r.category, dtype, label, None))
    return samples


def _open_checked(path: Path, cfg: IngestConfig, errors: _Errors) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files, which verify() alone misses
            img = im.copy()
            fmt = im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        errors.add(path, f"corrupt or truncated image ({type(exc).__name__}: {exc})")
        return None
    if img.mode not in cfg.allowed_modes:
        errors.add(path, f"unsupported image mode {img.mode!r} ({fmt}); allowed: {cfg.allowed_modes}")
        return None
    w, h = img.size
    if not (cfg.min_side <= w <= cfg.max_side and cfg.min_side <= h <= cfg.max_side):
        errors.add(path, f"image size {w}x{h} out of range; allowed sides {cfg.min_side}..{cfg.max_side} px")
        return None
    return img


def _row(s: Sample, root: Path, cfg: IngestConfig, errors: _Errors) -> dict[str, object] | None:
    img = _open_checked(s.path, cfg, errors)
    if img is None:
        return None
    row: dict[str, object] = {c: None for c in COLUMNS}
    row.update(sha256=sha256_file(s.path), path=s.path.as_posix(), relpath=s.relpath, dataset=cfg.dataset,
               category=s.category, label=s.label, defect_type=(s.cls or None) if s.label == "defective" else None,
               width=img.width, height=img.height, mode=img.mode)
    facts = None
    if s.mask is not None:
        try:
            with Image.open(s.mask) as m:
                m.load()
                mask_img = m.convert("L")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            errors.add(s.mask, f"corrupt or truncated mask ({type(exc).__name__}: {exc})")
            return None
        if mask_img.size != img.size:
            errors.add(s.mask, f"mask size {mask_img.width}x{mask_img.height} differs from its image "
                               f"{s.path} ({img.width}x{img.height}); a mask must match its image")
            return None
        mask = np.asarray(mask_img) > 127
        if not mask.any() and cfg.empty_masks == "error":
            errors.add(s.mask, "mask of a defective image is empty (all black); set ingest.empty_masks: allow "
                               "to keep such images without location facts")
            return None
        gray = np.asarray(img.convert("L"), dtype=np.float32)
        facts = mask_facts(mask, gray, cfg.mask_facts)  # None for an allowed empty mask
        row["mask_path"] = s.mask.as_posix()
        if facts is not None:
            row.update({k: v for k, v in facts.as_row().items() if k in MASK_FACT_COLUMNS})
    row["reason"] = reference_reason(s.label, row["defect_type"], facts, cfg.defect_types)  # type: ignore[arg-type]
    return row


def assign_splits(df: pd.DataFrame, fractions: dict[str, float], seed: str = "") -> pd.Series:
    """Within each (category, class) group, order by sha1(seed + relpath) and cut at the fractions.

    Counts use largest remainders, so each group's split sizes are as close to the fractions as integers allow.
    """
    out = pd.Series(index=df.index, dtype="string")
    cls = df["defect_type"].fillna(df["label"])
    for _, idx in df.groupby([df["category"], cls], sort=True).groups.items():
        keys = sorted(idx, key=lambda i: hashlib.sha1((seed + str(df.at[i, "relpath"])).encode()).hexdigest())
        n = len(keys)
        raw = [fractions[s] * n for s in SPLITS]
        counts = [int(np.floor(r)) for r in raw]
        order = sorted(range(len(SPLITS)), key=lambda k: (-(raw[k] - counts[k]), k))
        for k in order[: n - sum(counts)]:
            counts[k] += 1
        pos = 0
        for split, c in zip(SPLITS, counts):
            for i in keys[pos:pos + c]:
                out.at[i] = split
            pos += c
    return out


def run(cfg: IngestConfig, root: Path, out: Path, metrics: Path | None = None,
        report: Path | None = None) -> IngestReport:
    """Scan `root` with the configured adapter and write `out/manifest.parquet` (atomically)."""
    t0 = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        raise StageError(f"ingest.root: dataset folder {root} does not exist")
    errors = _Errors()
    samples = ADAPTERS[cfg.adapter](root, cfg, errors)
    rows = [r for s in samples if (r := _row(s, root, cfg, errors)) is not None]
    reviews = Path(cfg.reviews) if cfg.reviews else None
    if reviews is not None and not reviews.is_dir():
        log.info("ingest.reviews: %s does not exist; no reviewed images", reviews)
    rev_rows = [r for s in (scan_reviews(reviews, cfg, errors) if reviews else [])
                if (r := _row(s, root, cfg, errors)) is not None]
    if errors:
        shown = "\n".join(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise StageError(f"ingest ({cfg.adapter} adapter, root {root}) found {len(errors)} problem(s); "
                         f"nothing was written:\n{shown}{more}")
    if not rows:
        raise StageError(f"ingest: no images with extensions {cfg.image_exts} under {root}")
    df = pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)
    df["split"] = assign_splits(df, cfg.splits, cfg.split_seed).astype("string")
    df["source"] = pd.Series("dataset", index=df.index, dtype="string")
    known = set(df["sha256"])
    fresh = [r for r in rev_rows if r["sha256"] not in known]
    dups = len(rev_rows) - len(fresh)
    if dups:
        log.warning("ingest: %d reviewed image(s) are already in the dataset; their dataset answers and splits "
                    "stand", dups)
    if fresh:  # after the cut: the dataset's own images never move
        rev = pd.DataFrame(fresh, columns=list(COLUMNS)).astype(COLUMNS)
        rev["split"], rev["source"] = "labelled", "review"
        rev = rev.drop_duplicates("sha256", keep="last")  # the latest review of the same image wins
        df = pd.concat([df, rev.astype(COLUMNS)], ignore_index=True)
    df = df.sort_values(["category", "label", "defect_type", "relpath"], na_position="first").reset_index(drop=True)
    has_masks = bool(df["mask_path"].notna().any())
    has_types = bool(df["defect_type"].notna().any())
    empty_masks = int((df["mask_path"].notna() & df["area_frac"].isna()).sum())
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(Path(out) / "manifest.parquet", buf.getvalue())
    dt = time.perf_counter() - t0
    per_split = {s: int((df["split"] == s).sum()) for s in SPLITS}
    rep = IngestReport(images=len(df), defective=int((df["label"] == "defective").sum()), has_masks=has_masks,
                       has_types=has_types, seconds=round(dt, 3), per_split=per_split,
                       reviewed=int((df["source"] == "review").sum()), reviewed_duplicates=dups)
    if metrics:
        write_json(metrics, {"images": rep.images, "defective": rep.defective, "has_masks": has_masks,
                             "empty_masks": empty_masks, "reviewed": rep.reviewed,
                             "reviewed_duplicates": rep.reviewed_duplicates,
                             "has_types": has_types, "seconds": rep.seconds,
                             **{f"split_{k}": v for k, v in per_split.items()}})
    if report:
        cls = df["defect_type"].fillna(df["label"])
        table = pd.crosstab([df["category"], cls], df["split"]).reindex(columns=list(SPLITS), fill_value=0)
        rows_md = [[c, k, *map(int, vals)] for (c, k), vals in zip(table.index, table.values)]
        example = df[df["label"] == "defective"].head(1)
        ex = f"\n\nExample reference reason: _{example['reason'].iloc[0]}_\n" if len(example) else "\n"
        if rep.reviewed or rep.reviewed_duplicates:
            ex += (f"\n{rep.reviewed} reviewed images (`edgeqa review`, {reviews}) are in `labelled`, counted "
                   f"in the table; {rep.reviewed_duplicates} reviewed images already in the dataset were left "
                   "out.\n")
        atomic_write_text(report, f"# ingest\n\n{rep.images} images ({rep.defective} defective) from `{root}` "
                                  f"({cfg.adapter} adapter) in {rep.seconds:.1f} s. Masks: "
                                  f"{'yes' if has_masks else 'no (mask metrics n/a)'}; defect types: "
                                  f"{'yes' if has_types else 'no (type metrics n/a)'}.\n\n"
                          + md_table(["category", "class", *SPLITS], rows_md) + ex)
    log.info("ingest: %d images (%d defective) in %.1f s -> %s", rep.images, rep.defective, dt, out)
    return rep
