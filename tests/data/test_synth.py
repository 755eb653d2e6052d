"""The synthetic generator: layout, determinism, and difficulty (hard, but learnable)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from edgeqa.data import ingest
from edgeqa.data import synth


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_exact_mvtec_layout_with_masks(tiny_synth, tiny_params):
    for cat in tiny_params.synth.categories:
        base = tiny_synth / cat.name
        assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted([*cat.defect_types, "good"])
        assert [p.name for p in (base / "train").iterdir()] == ["good"]
        for t in cat.defect_types:
            imgs = sorted((base / "test" / t).glob("*.png"))
            assert len(imgs) == tiny_params.synth.defective_per_type
            for im in imgs:
                m = np.asarray(Image.open(base / "ground_truth" / t / f"{im.stem}_mask.png"))
                assert m.shape == (tiny_params.synth.image_size,) * 2 and set(np.unique(m)) == {0, 255}


def test_deterministic_by_seed_and_independent_of_workers(tiny_params, tiny_synth, tmp_path):
    cfg = tiny_params.synth.model_copy(update={"workers": 2})
    synth.run(cfg, tmp_path / "a")
    assert _files(tmp_path / "a") == _files(tiny_synth)
    synth.run(cfg.model_copy(update={"seed": cfg.seed + 1}), tmp_path / "b")
    assert _files(tmp_path / "b") != _files(tiny_synth)


def test_defect_size_and_contrast_are_continuous(tiny_manifest):
    df = pd.read_parquet(tiny_manifest)
    d = df[df.label == "defective"]
    assert d.area_frac.nunique() > 0.8 * len(d)
    assert d.size_class.nunique() >= 3


@pytest.fixture(scope="module")
def demo_data(params, tmp_path_factory):
    """The demo-profile synthetic data (the offline default of `make run`)."""
    d = tmp_path_factory.mktemp("demo")
    synth.run(params.synth, d / "synth")
    ingest.run(params.ingest, d / "synth", d / "ingest")
    return pd.read_parquet(d / "ingest" / "manifest.parquet")


def _auroc(y, s) -> float:
    a = roc_auc_score(y, s)
    return max(a, 1 - a)


@pytest.mark.slow
def test_no_global_image_statistic_separates_good_from_defective(demo_data):
    y = (demo_data.label == "defective").to_numpy()
    stats: dict[str, list[float]] = {}
    for path in demo_data.path:
        a = np.asarray(Image.open(path).convert("L"), np.float32)
        gy, gx = np.gradient(a)
        stats.setdefault("mean", []).append(float(a.mean()))
        stats.setdefault("std", []).append(float(a.std()))
        for q in (1, 5, 25, 50, 75, 95, 99):
            stats.setdefault(f"p{q}", []).append(float(np.percentile(a, q)))
        stats.setdefault("gradient_energy", []).append(float((gx ** 2 + gy ** 2).mean()))
    aurocs = {k: _auroc(y, v) for k, v in stats.items()}
    assert max(aurocs.values()) <= 0.70, aurocs


@pytest.mark.slow
def test_linear_probe_on_imagenet_lite0_is_hard_but_learnable(demo_data):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgeqa.vlm.vision import load_lite0, pooled_features

    y = (demo_data.label == "defective").to_numpy().astype(int)
    x = pooled_features(load_lite0(), list(demo_data.path))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    p = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    auroc = roc_auc_score(y, p)
    assert 0.80 <= auroc <= 0.95, auroc
