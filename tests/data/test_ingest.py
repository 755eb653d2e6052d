"""Ingestion: adapters, manifest content, and each kind of bad input stopped with a message naming it."""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from edgeqa.data import ingest
from edgeqa.errors import StageError
from edgeqa.data.manifest import COLUMNS

from .helpers import img, mask, mvtec


@pytest.fixture
def cfg(params):
    return params.ingest.model_copy(update={"dataset": "toy", "defect_types": ["dent", "scratch"]})


def _run(cfg, root, tmp_path) -> pd.DataFrame:
    out = tmp_path / "out"
    ingest.run(cfg, root, out)
    return pd.read_parquet(out / "manifest.parquet")


def test_mvtec_layout_manifest(cfg, tmp_path):
    df = _run(cfg, mvtec(tmp_path / "ds"), tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 20 and (df.label == "defective").sum() == 12
    d = df[df.label == "defective"].iloc[0]
    assert d.mask_path.endswith("_mask.png") and d.location in ("left", "upper left", "center", "top")
    assert d.n_regions == 1 and d.size_class and d.polarity and d.defect_type in ("dent", "scratch")
    assert "defect:" in d.reason and d.location in d.reason
    g = df[df.label == "good"].iloc[0]
    assert pd.isna(g.defect_type) and pd.isna(g.mask_path) and pd.isna(g.location)
    assert df.sha256.str.len().eq(64).all()


def test_splits_are_fixed_by_relative_path_and_per_group(cfg, tmp_path):
    root = mvtec(tmp_path / "ds", goods=20, per=10)
    a = _run(cfg, root, tmp_path)
    # the same files under another root give the same splits: the key is the path relative to the root
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    b = _run(cfg, moved, tmp_path)
    assert a.set_index("relpath").split.equals(b.set_index("relpath").split)
    g = a[a.label == "good"].split.value_counts().to_dict()
    assert g == {"labelled": 6, "unlabelled": 8, "val": 2, "test": 4}
    for t in ("dent", "scratch"):
        assert a[a.defect_type == t].split.value_counts().to_dict() == {"labelled": 3, "unlabelled": 4, "val": 1,
                                                                        "test": 2}


def test_folder_adapter_without_masks_or_types_still_flows(params, tmp_path):
    root = tmp_path / "parts"
    for i in range(8):
        img(root / "ok" / f"g{i}.jpg")
        img(root / "ng" / f"d{i}.bmp", mode="L")
    cfg = params.ingest.model_copy(update={"adapter": "folder", "dataset": "parts", "good_class": "ok",
                                           "defect_types": None})
    df = _run(cfg, root, tmp_path)
    assert len(df) == 16 and set(df["mode"]) == {"RGB", "L"}
    d = df[df.label == "defective"]
    assert d.defect_type.isna().all() and d.mask_path.isna().all() and d.location.isna().all()
    assert (d.reason == "defect: visible on the surface").all()


def test_folder_adapter_with_mask_dir(params, tmp_path):
    root = tmp_path / "parts"
    for i in range(4):
        img(root / "good" / f"g{i}.png")
        img(root / "crack" / f"c{i}.png")
        mask(tmp_path / "masks" / "crack" / f"c{i}_m.png")
    cfg = params.ingest.model_copy(update={"adapter": "folder", "dataset": "parts", "defect_types": ["crack"],
                                           "mask_dir": str(tmp_path / "masks"), "mask_suffix": "_m"})
    df = _run(cfg, root, tmp_path)
    assert df[df.label == "defective"].location.notna().all()


def test_magnetic_tile_layout(params, tmp_path):
    root = tmp_path / "mt"
    for i in range(4):
        img(root / "MT_Free" / "Imgs" / f"f{i}.jpg", mode="L")
        mask(root / "MT_Free" / "Imgs" / f"f{i}.png", box=(0, 0, 0, 0))
        img(root / "MT_Crack" / "Imgs" / f"c{i}.jpg", mode="L")
        mask(root / "MT_Crack" / "Imgs" / f"c{i}.png")
    cfg = params.ingest.model_copy(update={"adapter": "magnetic_tile", "dataset": "mt", "good_class": "free",
                                           "defect_types": ["crack"]})
    df = _run(cfg, root, tmp_path)
    assert set(df.category) == {"magnetic_tile"} and (df.label == "good").sum() == 4
    assert df[df.label == "good"].mask_path.isna().all()


# --------------------------------------------------------------------------------------- bad input
def _expect_stop(cfg, root, tmp_path, *needles: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(StageError) as ei:
        ingest.run(cfg, root, out)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in:\n{msg}"
    assert "nothing was written" in msg or "does not exist" in msg
    assert not out.exists(), "nothing half-written"


def test_corrupt_and_truncated_images(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    bad = root / "widget" / "train" / "good" / "000.png"
    bad.write_bytes(b"not an image at all")
    trunc = root / "widget" / "train" / "good" / "001.png"
    trunc.write_bytes(trunc.read_bytes()[:60])
    _expect_stop(cfg, root, tmp_path, str(bad), str(trunc), "corrupt or truncated")


def test_unsupported_mode(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    p = root / "widget" / "train" / "good" / "002.png"
    Image.new("RGBA", (64, 64)).save(p)
    _expect_stop(cfg, root, tmp_path, str(p), "unsupported image mode 'RGBA'", "allowed: ['L', 'RGB']")


def test_image_size_out_of_range(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    p = img(root / "widget" / "train" / "good" / "big.png", size=(16, 64))
    _expect_stop(cfg, root, tmp_path, str(p), "16x64 out of range", "32..4096")


def test_mask_without_image_and_image_without_mask(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    orphan = mask(root / "widget" / "ground_truth" / "dent" / "099_mask.png")
    (root / "widget" / "ground_truth" / "scratch" / "003_mask.png").unlink()
    _expect_stop(cfg, root, tmp_path, str(orphan), "mask without image",
                 str(root / "widget" / "test" / "scratch" / "003.png"), "defective image without its mask")


def test_mask_of_wrong_size(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    m = mask(root / "widget" / "ground_truth" / "dent" / "001_mask.png", size=(32, 32), box=(1, 1, 5, 5))
    _expect_stop(cfg, root, tmp_path, str(m), "mask size 32x32 differs from its image")


def test_unknown_class_folder(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    img(root / "widget" / "test" / "smudge" / "000.png")
    _expect_stop(cfg, root, tmp_path, "smudge", "unknown class folder", "allowed: ['good', 'dent', 'scratch']")


def test_empty_mask_is_an_error_unless_allowed(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    m = mask(root / "widget" / "ground_truth" / "dent" / "002_mask.png", box=(0, 0, 0, 0))
    _expect_stop(cfg, root, tmp_path, str(m), "empty", "ingest.empty_masks")
    df = _run(cfg.model_copy(update={"empty_masks": "allow"}), root, tmp_path)
    row = df[df.mask_path == m.as_posix()].iloc[0]
    assert row.label == "defective" and pd.isna(row.location) and row.reason == "dent defect: visible on the surface"


def test_missing_root(cfg, tmp_path):
    _expect_stop(cfg, tmp_path / "nope", tmp_path, "does not exist")


def test_existing_manifest_survives_a_failed_run(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    out = tmp_path / "out"
    ingest.run(cfg, root, out)
    before = (out / "manifest.parquet").read_bytes()
    (root / "widget" / "train" / "good" / "000.png").write_bytes(b"junk")
    with pytest.raises(StageError):
        ingest.run(cfg, root, out)
    assert (out / "manifest.parquet").read_bytes() == before
    assert sorted(p.name for p in Path(out).iterdir()) == ["manifest.parquet"]
