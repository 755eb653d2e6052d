"""The same GX suites the `validate` stage runs, on a good manifest and on broken fixtures."""

import shutil

import pandas as pd
import pytest

from edgeqa.data import validate
from edgeqa.errors import StageError


@pytest.fixture
def good(tiny_manifest):
    return pd.read_parquet(tiny_manifest)


def _check(tiny_params, df, tmp_path):
    m = tmp_path / "m.parquet"
    df.to_parquet(m, index=False)
    cfg = tiny_params.ingest.model_copy(update={"root": "x"})
    return validate.run(cfg, tiny_params.validate_cfg, m, tmp_path / "docs", tmp_path / "metrics.json",
                        tmp_path / "report.md")


def test_good_manifest_passes_and_writes_data_docs(tiny_params, good, tmp_path):
    rep = _check(tiny_params, good, tmp_path)
    assert rep.success and rep.evaluated >= 30 and not rep.failed
    assert (tmp_path / "docs" / "index.html").exists()
    assert "PASSED" in (tmp_path / "report.md").read_text()


def _fails(tiny_params, df, tmp_path, expectation, *needles):
    with pytest.raises(StageError) as ei:
        _check(tiny_params, df, tmp_path)
    msg = str(ei.value)
    assert expectation in msg, msg
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg}"
    assert (tmp_path / "docs" / "index.html").exists(), "Data Docs are written on failure too"
    assert "FAILED" in (tmp_path / "report.md").read_text()
    return msg


def test_duplicate_image_across_splits(tiny_params, good, tmp_path):
    dup = good.iloc[[0]].assign(split="test" if good.iloc[0].split != "test" else "val")
    msg = _fails(tiny_params, pd.concat([good, dup], ignore_index=True), tmp_path,
                 "expect_column_values_to_be_unique", good.iloc[0].path, good.iloc[0].sha256)
    assert "'split'" in msg


def test_type_label_and_size_out_of_set(tiny_params, good, tmp_path):
    bad = good.copy()
    i = bad.index[bad.label == "defective"][0]
    bad.loc[i, "defect_type"] = "smudge"
    bad.loc[0, "width"] = 5
    bad.loc[1, "label"] = "meh"
    _fails(tiny_params, bad, tmp_path, "expect_column_values_to_be_in_set", "smudge", bad.loc[i, "path"],
           "expect_column_values_to_be_between", "'width': 5", "'label': 'meh'")


def test_defective_without_mask_and_schema_drift(tiny_params, good, tmp_path):
    bad = good.copy()
    i = bad.index[bad.label == "defective"][0]
    bad.loc[i, "mask_path"] = None
    _fails(tiny_params, bad, tmp_path, "expect_column_values_to_not_be_null", bad.loc[i, "path"])
    _fails(tiny_params, good.drop(columns=["polarity"]), tmp_path, "expect_table_columns_to_match_ordered_list")


def test_mask_of_wrong_size_and_corrupt_image_on_disk(tiny_params, good, tmp_path):
    from PIL import Image

    bad = good.copy()
    d = bad.index[bad.label == "defective"][0]
    small = tmp_path / "small_mask.png"
    Image.new("L", (8, 8)).save(small)
    bad.loc[d, "mask_path"] = str(small)
    corrupt = tmp_path / "corrupt.png"
    shutil.copy(bad.loc[0, "path"], corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    bad.loc[0, "path"] = str(corrupt)
    _fails(tiny_params, bad, tmp_path, "files: expect_column_values_to_be_in_set on column 'mask_size_matches'",
           bad.loc[d, "path"], "column 'decoded'", str(corrupt))


def test_too_few_images_for_a_class_and_split(tiny_params, good, tmp_path):
    cls = good.defect_type.dropna().iloc[0]
    bad = good[~((good.defect_type == cls) & (good.split == "val"))]
    _fails(tiny_params, bad, tmp_path, "class_split_counts", f"'class': '{cls}'", "'split': 'val'", "'n': 0")


def test_split_fractions_out_of_tolerance(tiny_params, good, tmp_path):
    bad = good.copy()
    bad.loc[bad.split == "unlabelled", "split"] = "labelled"
    _fails(tiny_params, bad, tmp_path, "split_fractions", "'split': 'labelled'", "'split': 'unlabelled'")
