"""Stage `student_features`: the output of the student's frozen trunk (Lite0 stem + the first
`student.frozen_blocks` blocks, ImageNet weights, never trained) for every training-side image (labelled,
unlabelled, val; never test), computed once and shared by `baseline`, `sft` and `distill`.

Written: `features.safetensors` (N, C, H, W float32) and `index.json` (image hashes in row order, and the
settings that produced them, checked by the readers).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from edgeqa.config import StudentConfig
from edgeqa.errors import StageError
from edgeqa.io import atomic_dir, atomic_write_text, write_json
from edgeqa.report import md_table

log = logging.getLogger("edgeqa.student_features")
SPLITS = ("labelled", "unlabelled", "val")
FLIP_SPLIT = "labelled"  # only human answers are mirrored in training (their location words can be swapped)


def settings(cfg: StudentConfig) -> dict[str, Any]:
    return {"image_size": cfg.image_size, "frozen_blocks": cfg.frozen_blocks, "weights": "lite0-imagenet",
            "augment_flip": cfg.augment_flip}


def run(student: StudentConfig, manifest: Path, out: Path, metrics: Path | None = None, report: Path | None = None
        ) -> dict[str, Any]:
    """The frozen trunk of the `student` architecture on every training-side image of `manifest`, into `out`."""
    import torch
    from safetensors.torch import save_file

    from edgeqa.student.model import StudentModelConfig, VisionTrunk, lite0_into

    t0 = time.perf_counter()
    torch.set_num_threads(student.threads)
    df = pd.read_parquet(manifest)
    rows = df[df.split.isin(SPLITS)].reset_index(drop=True)
    if rows.empty:
        raise StageError(f"student_features: no images in the splits {list(SPLITS)} of {manifest}")
    cfg = StudentModelConfig(vision_blocks=max(1, student.frozen_blocks), frozen_blocks=student.frozen_blocks,
                             image_size=student.image_size)
    trunk = VisionTrunk(cfg.vision_blocks)
    lite0_into(trunk)
    trunk.eval()
    from edgeqa.vlm.vision import to_tensor

    parts: list[Any] = []
    flips: list[Any] = []
    mirrored = rows[rows.split == FLIP_SPLIT].reset_index(drop=True) if student.augment_flip else rows[:0]
    with torch.inference_mode():
        for i in range(0, len(rows), 32):
            x = to_tensor(list(rows.path[i:i + 32]), cfg.image_size)
            parts.append(trunk(x, 0, cfg.frozen_blocks) if cfg.frozen_blocks else x)
        # the mirrored images of the human-labelled split, through the trunk (conv features are not mirror-equal)
        for i in range(0, len(mirrored), 32):
            xf = torch.flip(to_tensor(list(mirrored.path[i:i + 32]), cfg.image_size), dims=[3])
            flips.append(trunk(xf, 0, cfg.frozen_blocks) if cfg.frozen_blocks else xf)
    feats = torch.cat(parts).contiguous()
    tensors = {"features": feats}
    if flips:
        tensors["flipped"] = torch.cat(flips).contiguous()
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "features.safetensors"))
        index = {"sha256": list(rows.sha256), "split": list(rows.split), "flipped_sha256": list(mirrored.sha256),
                 **settings(student)}
        (tmp / "index.json").write_text(json.dumps(index) + "\n")
    res = {"images": len(rows), "shape": list(feats.shape[1:]),
           "megabytes": round(sum(t.numel() for t in tensors.values()) * 4 / 2**20, 1),
           "seconds": round(time.perf_counter() - t0, 2), **settings(student)}
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, "# student_features\n\nThe student's frozen trunk, once for the training stages.\n\n"
                          + md_table(["figure", "value"], [[k, v] for k, v in res.items()]) + "\n")
    log.info("student_features: %s", res)
    return res


def load(student: StudentConfig, folder: Path, shas: list[str]) -> tuple[Any, Any]:
    """The cached features of the given images, in that order, and those of their mirror images (None when
    student.augment_flip is off; NaN rows for images outside the labelled split, which are never mirrored, so a
    misuse cannot pass silently); refuses a cache made with other settings."""
    from safetensors.torch import load_file

    idx_file = Path(folder) / "index.json"
    if not idx_file.is_file():
        raise StageError(f"{idx_file} is missing: run the student_features stage")
    idx = json.loads(idx_file.read_text())
    want = settings(student)
    got = {k: idx.get(k) for k in want}
    if got != want:
        raise StageError(f"{folder} was made with {got} but params ask for {want}: rerun student_features")
    pos = {s: i for i, s in enumerate(idx["sha256"])}
    missing = [s for s in shas if s not in pos]
    if missing:
        raise StageError(f"{folder} has no features for {len(missing)} image(s) (first sha256 {missing[0][:16]}); "
                         "rerun student_features")
    import torch

    data = load_file(str(Path(folder) / "features.safetensors"))
    feats = data["features"][torch.tensor([pos[s] for s in shas], dtype=torch.long)]
    if "flipped" not in data:
        return feats, None
    fpos = {s: i for i, s in enumerate(idx["flipped_sha256"])}
    flipped = torch.full_like(feats, float("nan"))
    have = [k for k, s in enumerate(shas) if s in fpos]
    if have:
        flipped[torch.tensor(have)] = data["flipped"][torch.tensor([fpos[shas[k]] for k in have])]
    return feats, flipped
