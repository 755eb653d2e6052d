"""The manifest schema: one row per image. Shared by ingest (writer), validate (GX suite) and later stages,
with the reference answer each row stands for."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgeqa_runtime.schema import Answer, AnswerSchema

if TYPE_CHECKING:
    import pandas as pd

# name -> pandas dtype. Nullable dtypes so fields a dataset cannot have stay empty, not zero.
COLUMNS: dict[str, str] = {
    "sha256": "string",
    "path": "string",
    "relpath": "string",
    "dataset": "string",
    "category": "string",
    "label": "string",
    "defect_type": "string",
    "mask_path": "string",
    "width": "Int64",
    "height": "Int64",
    "mode": "string",
    "split": "string",
    "source": "string",  # dataset (ingest.root, split by the fixed cut) | review (edgeqa review: always labelled)
    "bbox_x0": "Int64",
    "bbox_y0": "Int64",
    "bbox_x1": "Int64",
    "bbox_y1": "Int64",
    "area_frac": "Float64",
    "location": "string",
    "size_class": "string",
    "n_regions": "Int64",
    "elongation": "Float64",
    "shape": "string",
    "orientation": "string",
    "polarity": "string",
    "reason": "string",
}
REQUIRED = ("sha256", "path", "relpath", "dataset", "category", "label", "width", "height", "mode", "split",
            "source", "reason")
SOURCES = ("dataset", "review")
MASK_FACT_COLUMNS = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "area_frac", "location", "size_class",
                     "n_regions", "elongation", "shape", "orientation", "polarity")
LABELS = ("good", "defective")

# A review batch (`edgeqa review`): <ingest.reviews>/<batch>/verdicts.csv + images/<sha256[:16]><ext>, one
# DVC-tracked folder per batch (<batch>.dvc beside it). Ingest adds its rows to the labelled split.
REVIEW_FILE = "verdicts.csv"
REVIEW_IMAGES = "images"
REVIEW_COLUMNS = ("file", "sha256", "dataset", "category", "verdict", "defect_type", "reviewer", "reviewed_at",
                  "origin", "note")


def reference_answer(row: Mapping[str, Any]) -> Answer:
    """The human reference answer of a manifest row (label, defect type, mask location, reference reason)."""
    import pandas as pd

    def val(key: str) -> str | None:
        v = row.get(key)
        return None if v is None or pd.isna(v) else str(v)

    return Answer(verdict=str(row["label"]), defect_type=val("defect_type"), location=val("location"),
                  reason=str(row["reason"]))


_MIRROR = {"upper left": "upper right", "upper right": "upper left", "left": "right", "right": "left",
           "lower left": "lower right", "lower right": "lower left"}
_MIRROR_RE = re.compile(r"\b(upper left|upper right|lower left|lower right|left|right)\b")


def mirror_answer(a: Answer) -> Answer:
    """The answer for the left-right mirrored image: location words swap sides, in the field and the reason."""
    loc = _MIRROR.get(a.location, a.location) if a.location else a.location
    return Answer(a.verdict, a.defect_type, loc, _MIRROR_RE.sub(lambda m: _MIRROR[m.group(1)], a.reason))


def schema_for(defect_types: Sequence[str] | None, manifest: pd.DataFrame) -> AnswerSchema:
    """The answer schema of a dataset: its defect types, and grid locations when any image has a mask."""
    return AnswerSchema.for_dataset(defect_types, bool(manifest["mask_path"].notna().any()))
