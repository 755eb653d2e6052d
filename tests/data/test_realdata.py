"""The truth test: ingest and validate the real magnetic-tile photographs with the `mtile` profile."""

import shutil

import pandas as pd
import pytest

from edgeqa.data import ingest
from edgeqa.config import profiles
from edgeqa.data import validate
from edgeqa.config import load_params

from ..conftest import REPO, mtile_root

pytestmark = [pytest.mark.realdata, pytest.mark.slow,
              pytest.mark.skipif(not mtile_root().is_dir(),
                                 reason=f"the magnetic-tile dataset is not at {mtile_root()} (EDGEQA_MTILE_ROOT)")]


def test_ingest_and_validate_magnetic_tile(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    profiles.apply("mtile", p, REPO)
    params = load_params(p)
    assert (REPO / params.ingest.root).resolve() == mtile_root(), "the profile and the tests locate it one way"
    rep = ingest.run(params.ingest, mtile_root(), tmp_path / "ingest")
    df = pd.read_parquet(tmp_path / "ingest" / "manifest.parquet")
    assert rep.images == len(df) == 933
    assert (df.label == "good").sum() == 665
    assert df[df.label == "defective"].defect_type.value_counts().to_dict() == {
        "blowhole": 81, "uneven": 71, "break": 58, "crack": 33, "fray": 25}
    assert set(df["mode"]) <= {"L", "RGB"}
    d = df[df.label == "defective"]
    assert d.mask_path.notna().all()
    assert d.location.isna().sum() == 2, "the two all-black Uneven masks carry no location"
    for split, frac in params.ingest.splits.items():
        assert abs((df.split == split).mean() - frac) < 0.02
    v = validate.run(params.ingest, params.validate_cfg, tmp_path / "ingest" / "manifest.parquet", tmp_path / "docs")
    assert v.success and v.evaluated >= 30
