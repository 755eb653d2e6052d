"""The manifest schema: one row per image. Shared by ingest (writer), validate (GX suite) and later stages."""

from __future__ import annotations

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
            "reason")
MASK_FACT_COLUMNS = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "area_frac", "location", "size_class",
                     "n_regions", "elongation", "shape", "orientation", "polarity")
LABELS = ("good", "defective")
