"""`edgeqa review`: human verdicts on images the line rejected or was unsure of, added to the `labelled` pool as
a new DVC data version.

Input, either:
- a CSV with the columns `image` (a path, relative to the CSV's folder or absolute), `verdict` (good |
  defective), `defect_type` (one of ingest.defect_types, for a defective image of a typed dataset), and
  optionally `category` and `note`;
- a folder in the `folder` adapter's layout: `SRC/<good class>/*`, `SRC/<defect type>/*` (or
  `SRC/defective/*` for a dataset without types).

Every row is checked before anything is written: the image decodes and passes ingest's mode and size rules,
the verdict and type are allowed, the category is known, and the image is new: not in the dataset (a `val` or
`test` image reviewed into training would leak), not reviewed before, not twice in this input. Problems are
listed by file or CSV line, and nothing is written.

A batch is `<ingest.reviews>/<UTC time>-<hex4>/` with `verdicts.csv` and `images/<sha256[:16]><ext>`, built
under a temporary name and renamed when complete. `track` then makes it a DVC data version: `dvc add`, `dvc
push` of that batch to the remote, and a git commit of `<batch>.dvc` alone, so the next run of the pipeline
(a nightly checkout included) trains on it. Ingest adds the rows after the dataset's fixed split cut
(edgeqa.data.ingest), so no existing image moves.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from edgeqa.config import IngestConfig
from edgeqa.data.ingest import _class_of, _Errors, _images_in, _open_checked, _subdirs, review_batches
from edgeqa.data.manifest import REVIEW_COLUMNS, REVIEW_FILE, REVIEW_IMAGES
from edgeqa.errors import StageError
from edgeqa.io import atomic_dir, sha256_file
from edgeqa.runs import RUN_IDENTITY

MAX_SHOWN = 25


@dataclass(frozen=True)
class Verdict:
    image: Path
    verdict: str
    defect_type: str | None
    category: str | None
    note: str
    where: str  # the CSV line or the folder, for messages


def read_csv(path: Path, errors: _Errors) -> list[Verdict]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not a readable CSV ({exc}); columns: image, verdict, defect_type[, category, "
                         "note]") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in ("image", "verdict") if c not in df.columns]
    if missing:
        raise StageError(f"{path}: missing the column(s) {missing}; columns: image, verdict, defect_type[, "
                         f"category, note] (got {list(df.columns)})")
    out = []
    for i, r in enumerate(df.to_dict("records"), start=2):  # line 1 is the header
        img = Path(r["image"].strip())
        verdict = r["verdict"].strip().lower()
        where = f"{path} line {i}"
        if not r["image"].strip():
            errors.add(where, "empty image path")
            continue
        if verdict not in ("good", "defective"):
            errors.add(where, f"verdict {r['verdict']!r}; allowed: good, defective")
            continue
        out.append(Verdict(img if img.is_absolute() else path.parent / img, verdict,
                           (r.get("defect_type") or "").strip() or None, (r.get("category") or "").strip() or None,
                           (r.get("note") or "").strip(), where))
    return out


def read_folder(root: Path, cfg: IngestConfig, errors: _Errors) -> list[Verdict]:
    out = []
    dirs = _subdirs(root)
    if not dirs:
        errors.add(root, f"no class folders; the layout is {root}/<class>/*.png with class {cfg.good_class!r} or "
                         f"one of {cfg.defect_types or ['defective']}")
    for d in dirs:
        if cfg.defect_types is None and d.name == "defective":
            label, dtype = "defective", ""
        else:
            mapped = _class_of(d.name, cfg, d, errors)
            if mapped is None:
                continue
            label, dtype = mapped
        for img in _images_in(d, cfg.image_exts):
            out.append(Verdict(img, label, dtype or None, None, "", str(d)))
    return out


def _manifest(path: Path | None) -> pd.DataFrame | None:
    if path is None or not path.is_file():
        return None
    return pd.read_parquet(path, columns=["sha256", "relpath", "category", "split"])


def add(src: Path, cfg: IngestConfig, reviews: Path, manifest: Path | None = None, reviewer: str | None = None,
        category: str | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Check every verdict in `src` (a CSV or a folder) and write one new batch under `reviews`.
    {batch, path, images, good, defective}. Raises StageError listing every problem; then nothing is written."""
    src = Path(src)
    errors = _Errors()
    if src.is_file():
        items = read_csv(src, errors)
    elif src.is_dir():
        items = read_folder(src, cfg, errors)
    else:
        raise StageError(f"{src}: no such CSV or folder of reviewed images")
    reviewer = reviewer or os.environ.get("EDGEQA_REVIEWER") or getpass.getuser()
    known = _manifest(manifest)
    known_cats = sorted(set(known[~known.relpath.str.startswith("reviews/")].category)) if known is not None else None
    in_dataset = ({} if known is None else
                  dict(zip(known.sha256, zip(known.relpath, known.split))))
    reviewed: dict[str, str] = {}
    for batch in review_batches(reviews):
        prev = pd.read_csv(batch / REVIEW_FILE, dtype=str, keep_default_na=False)
        reviewed.update({s: f"{batch.name}/{f}" for s, f in zip(prev.sha256, prev.file)})
    rows: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for v in items:
        if not v.image.is_file():
            errors.add(v.where, f"no such image {v.image}")
            continue
        if v.image.suffix.lower() not in cfg.image_exts:
            errors.add(v.image, f"extension {v.image.suffix!r}; allowed: {cfg.image_exts}")
            continue
        dtype = v.defect_type
        if v.verdict == "good" and dtype:
            errors.add(v.where, f"a good image has no defect_type (got {dtype!r})")
            continue
        if v.verdict == "defective" and cfg.defect_types is not None:
            if dtype not in cfg.defect_types:
                errors.add(v.where, f"defect_type {dtype!r}; a defective image of dataset {cfg.dataset!r} takes "
                                    f"one of {cfg.defect_types}")
                continue
        elif v.verdict == "defective":
            dtype = None  # the dataset has no types
        cat = category or v.category
        if cat is None:
            if known_cats is not None and len(known_cats) == 1:
                cat = known_cats[0]
            else:
                errors.add(v.where, "no category: give --category or a category column"
                                    + (f" (the dataset has {known_cats})" if known_cats else ""))
                continue
        if known_cats is not None and cat not in known_cats:
            errors.add(v.where, f"category {cat!r} is not in the dataset; known: {known_cats}")
            continue
        if _open_checked(v.image, cfg, errors) is None:
            continue
        sha = sha256_file(v.image)
        if sha in in_dataset:
            rel, split = in_dataset[sha]
            errors.add(v.image, f"already in the dataset as {rel} (split {split}); only new images are reviewed "
                                "into training (a val or test image would leak)")
            continue
        if sha in reviewed:
            errors.add(v.image, f"already reviewed in {reviewed[sha]}")
            continue
        if sha in seen:
            errors.add(v.image, f"the same image as {seen[sha]} in this input")
            continue
        seen[sha] = str(v.image)
        rows.append({"file": f"{sha[:16]}{v.image.suffix.lower()}", "sha256": sha, "dataset": cfg.dataset,
                     "category": cat, "verdict": v.verdict, "defect_type": dtype or "", "reviewer": reviewer,
                     "reviewed_at": "", "origin": str(v.image), "note": v.note})
    if errors:
        shown = "\n".join(f"  {e}" for e in errors[:MAX_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_SHOWN} more" if len(errors) > MAX_SHOWN else ""
        raise StageError(f"review of {src}: {len(errors)} problem(s); nothing was written:\n{shown}{more}")
    if not rows:
        raise StageError(f"review of {src}: no images (extensions {cfg.image_exts})")
    now = now or dt.datetime.now(dt.UTC)
    when = now.isoformat(timespec="seconds")
    name = f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"
    final = reviews / name
    with atomic_dir(final) as tmp:
        (tmp / REVIEW_IMAGES).mkdir()
        for r in rows:
            shutil.copyfile(r["origin"], tmp / REVIEW_IMAGES / r["file"])
            r["reviewed_at"] = when
        pd.DataFrame(rows, columns=list(REVIEW_COLUMNS)).to_csv(tmp / REVIEW_FILE, index=False)
    good = sum(r["verdict"] == "good" for r in rows)
    return {"batch": name, "path": final, "images": len(rows), "good": good, "defective": len(rows) - good}


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1",
                                                                          **(env or {})})
    if r.returncode != 0:
        raise StageError(f"{' '.join(cmd)} in {cwd} failed (exit {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-1200:]}")
    return r.stdout


def track(root: Path, batch: Path, push: bool = True, commit: bool = True, message: str | None = None
          ) -> dict[str, Any]:
    """Make `batch` a DVC data version of the project at `root`: `dvc add`, `dvc push` to the default remote,
    and a git commit of its .dvc file and the folder's .gitignore only (nothing else staged is committed).
    A failed push leaves the batch added, and says so. {dvc_file, pushed, commit}."""
    rel = batch.resolve().relative_to(root.resolve())
    _run(["dvc", "add", str(rel)], root)
    dvc_file = rel.with_name(rel.name + ".dvc")
    out: dict[str, Any] = {"dvc_file": str(dvc_file), "pushed": False, "commit": None}
    if push:
        _run(["dvc", "push", str(dvc_file)], root)
        out["pushed"] = True
    if commit:
        paths = [str(dvc_file), str(rel.parent / ".gitignore")]
        ident: dict[str, str] = {}
        if subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True).returncode != 0:
            ident = RUN_IDENTITY  # no git identity here (a CI machine, a service account)
        _run(["git", "add", "--", *paths], root)
        _run(["git", "commit", "--quiet", "-m", message or f"review: {rel.name}", "--", *paths], root, ident)
        out["commit"] = _run(["git", "rev-parse", "HEAD"], root).strip()
    return out
