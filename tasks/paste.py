"""Synthetic defects pasted onto real good training images (`sft.paste`), to enlarge rare defect types.

For each dataset type listed in `sft.paste.renderers` (type -> one of the generator's shapes), `per_type` good
images of the `labelled` split are drawn (seeded), resized to the student's input size, and given a defect with
the synthetic generator's own renderer and settings (`synth.defect_scale`, `synth.contrast`). The blended mask
is measured like a real one (tasks.maskfacts), so each pasted image carries its mask, type, location and a
reference answer written by the same template as the human references. Grayscale sources stay grayscale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tasks.answer import Answer, AnswerSchema
from tasks.common import StageError
from tasks.config import Params


def paste_one(good: np.ndarray, shape: str, rng: np.random.Generator, p: Params) -> tuple[np.ndarray, np.ndarray]:
    """A defect of the given shape blended into an RGB uint8 image (square). Returns (image, binary mask)."""
    from tasks.config import SynthCategory
    from tasks.synth import _draw_defect

    s = good.shape[0]
    cat = SynthCategory(name="pasted", kind="texture", defect_types=["crack", "scratch", "hole"])
    soft_img, delta, tint = _draw_defect(shape, cat, rng, s, p.synth, (s / 2, s / 2, 0.45 * s))
    soft = np.asarray(soft_img, np.float32) / 255.0
    img = good.astype(np.float32)
    local = img * tint[None, None, :] + delta
    out = img * (1 - soft[..., None]) + local * soft[..., None]
    mask = np.where(soft >= 0.5, 255, 0).astype(np.uint8)
    if not mask.any():
        mask = np.where(soft >= soft.max() * 0.5, 255, 0).astype(np.uint8)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def paste_examples(p: Params, labelled: pd.DataFrame, schema: AnswerSchema
                   ) -> tuple[list[np.ndarray], list[Answer], dict[str, Any]]:
    """The pasted images (RGB uint8 at the student's input size), their reference answers, and a summary."""
    from PIL import Image

    from tasks.maskfacts import mask_facts, reference_reason

    cfg = p.sft.paste
    renderers = dict(cfg.renderers)
    unknown = sorted(set(renderers) - set(schema.types))
    if unknown:
        raise StageError(f"sft.paste.renderers names type(s) {unknown} that the dataset does not have; "
                         f"its types: {list(schema.types)}")
    if not cfg.renderers:
        raise StageError("sft.paste.enabled is true but sft.paste.renderers is empty: map at least one dataset type "
                         "to a shape (crack, scratch, contamination, broken, stain, hole)")
    goods = labelled[labelled.label == "good"].reset_index(drop=True)
    if goods.empty:
        raise StageError("sft.paste needs good images in the labelled split; there are none")
    rng = np.random.default_rng(cfg.seed)
    s = p.student.image_size
    images, answers = [], []
    made: dict[str, int] = {}
    for dtype, shape in sorted(renderers.items()):
        for _ in range(cfg.per_type):
            row = goods.iloc[int(rng.integers(len(goods)))]
            with Image.open(row.path) as im:
                gray_source = im.mode in ("L", "I;16", "I")
                base = np.asarray(im.convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
            img, mask = paste_one(base, shape, rng, p)
            if gray_source:
                img = np.repeat(np.asarray(Image.fromarray(img).convert("L"))[..., None], 3, axis=2)
            gray = np.asarray(Image.fromarray(img).convert("L"), np.float32)
            facts = mask_facts(mask > 0, gray, p.ingest.mask_facts)
            if facts is None:
                continue
            reason = reference_reason("defective", dtype, facts, list(schema.types))
            loc = facts.location if schema.locations else None
            images.append(img)
            answers.append(Answer("defective", dtype, loc, reason))
            made[dtype] = made.get(dtype, 0) + 1
    return images, answers, {"per_type": made, "renderers": renderers}
