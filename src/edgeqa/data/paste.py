"""Synthetic defects pasted onto real good training images (`sft.paste`), to enlarge rare defect types.

For each dataset type listed in `sft.paste.renderers` (type -> one of the generator's shapes), `per_type` good
images of the `labelled` split are drawn (seeded), resized to the student's input size, and given a defect with
the synthetic generator's own renderer, with `sft.paste.defect_scale` and `sft.paste.contrast`. The blended mask
is measured like a real one (edgeqa.data.maskfacts), so each pasted image carries its mask, type, location and a
reference answer written by the same template as the human references. Grayscale sources stay grayscale.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from edgeqa_runtime.schema import Answer, AnswerSchema
from edgeqa.errors import StageError
from edgeqa.config import MaskFactsConfig, PasteConfig


def paste_one(good: np.ndarray, shape: str, rng: np.random.Generator, cfg: PasteConfig
              ) -> tuple[np.ndarray, np.ndarray]:
    """A defect of the given shape blended into an RGB uint8 image (square). Returns (image, binary mask)."""
    from edgeqa.data.synth import blend, draw_defect

    s = good.shape[0]
    drawn = draw_defect(shape, "texture", rng, s, cfg.defect_scale, cfg.contrast, (s / 2, s / 2, 0.45 * s))
    out, mask = blend(good.astype(np.float32), *drawn)
    return np.clip(out, 0, 255).astype(np.uint8), mask


def paste_examples(cfg: PasteConfig, image_size: int, facts_cfg: MaskFactsConfig, labelled: pd.DataFrame,
                   schema: AnswerSchema) -> tuple[list[np.ndarray], list[Answer], dict[str, Any]]:
    """The pasted images (RGB uint8 at `image_size`), their reference answers (reasons worded with the dataset's
    own mask-fact thresholds `facts_cfg`), and a summary."""
    from PIL import Image

    from edgeqa.data.maskfacts import mask_facts, reference_reason

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
    s = image_size
    images, answers = [], []
    made: dict[str, int] = {}
    for dtype, shape in sorted(renderers.items()):
        for _ in range(cfg.per_type):
            row = goods.iloc[int(rng.integers(len(goods)))]
            with Image.open(row.path) as im:
                gray_source = im.mode in ("L", "I;16", "I")
                base = np.asarray(im.convert("RGB").resize((s, s), Image.Resampling.BILINEAR))
            img, mask = paste_one(base, shape, rng, cfg)
            if gray_source:
                img = np.repeat(np.asarray(Image.fromarray(img).convert("L"))[..., None], 3, axis=2)
            gray = np.asarray(Image.fromarray(img).convert("L"), np.float32)
            facts = mask_facts(mask > 0, gray, facts_cfg)
            if facts is None:
                continue
            reason = reference_reason("defective", dtype, facts, list(schema.types))
            loc = facts.location if schema.locations else None
            images.append(img)
            answers.append(Answer("defective", dtype, loc, reason))
            made[dtype] = made.get(dtype, 0) + 1
    return images, answers, {"per_type": made, "renderers": renderers}
