"""The drift rules by construction: PSI, the defect-rate shift, image sizes training never had, and no verdict
on a small batch."""

import numpy as np
import pytest

from edgeqa.config.schema import DriftConfig
from edgeqa.drift import check, psi, render

CFG = DriftConfig(min_batch=50, max_psi=0.25, max_defect_rate_shift=0.15, max_unseen_size_share=0.05)
RNG = np.random.default_rng(0)


def _answers(p, size=(256, 256), bundle="v1"):
    return [{"p_defective": float(x), "verdict": "defective" if x >= 0.5 else "good", "width": size[0],
             "height": size[1], "bundle": bundle} for x in p]


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shifted_one():
    ref = RNG.beta(2, 5, 2000)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-9)
    assert psi(ref, RNG.beta(2, 5, 2000)) < 0.05
    assert psi(ref, RNG.beta(5, 2, 2000)) > 1.0


def test_the_same_answers_at_the_logs_precision_are_no_drift_even_when_scores_are_tied():
    ref = _answers(np.repeat([0.499079541411701, 0.4991632201139147, 0.4993305776542768], [9, 6, 5]))
    logged = [dict(a, p_defective=round(a["p_defective"], 6)) for a in ref]  # as the runtime writes them
    rep = check(CFG.model_copy(update={"min_batch": 10}), ref, {(256, 256)}, logged)
    assert rep["drifted"] is False and rep["rules"][0]["value"] == 0.0


def test_a_batch_like_the_reference_passes_and_a_shifted_one_fails_the_rules_it_breaks():
    ref = _answers(RNG.beta(2, 5, 400))
    same = check(CFG, ref, {(256, 256)}, _answers(RNG.beta(2, 5, 300)))
    assert same["drifted"] is False and all(r["passed"] for r in same["rules"][:3])
    assert [r["passed"] for r in same["rules"][3:]] == [None] * 3  # no image reference: not compared, not passed
    assert "not compared: brightness_shift, contrast_shift, embedding_shift" in same["summary"]
    shifted = check(CFG, ref, {(256, 256)}, _answers(RNG.beta(6, 2, 300)))
    failed = {r["rule"] for r in shifted["rules"] if r["passed"] is False}
    assert shifted["drifted"] is True and failed == {"psi_p_defective", "defect_rate_shift"}
    assert shifted["ks_p_defective"]["pvalue"] < 1e-6 and "psi_p_defective" in shifted["summary"]
    assert "| psi_p_defective |" in render(shifted) and render(shifted).startswith("# drift: DRIFT")


def test_images_of_a_size_training_never_had_are_drift_and_a_small_batch_gets_no_verdict():
    ref = _answers(RNG.beta(2, 5, 400))
    new_cam = check(CFG, ref, {(256, 256)}, _answers(RNG.beta(2, 5, 100), size=(320, 240)))
    assert new_cam["drifted"] and [r["rule"] for r in new_cam["rules"] if r["passed"] is False] == [
        "unseen_size_share"]
    few = check(CFG, ref, {(256, 256)}, _answers(RNG.beta(6, 2, 49)))
    assert few["drifted"] is None and few["rules"] == [] and "min_batch 50" in few["summary"]
    assert render(few).startswith("# drift: no verdict")
    with pytest.raises(ValueError, match="no reference predictions"):
        check(CFG, [], {(256, 256)}, ref)


def _logged(n=300, brightness=120.0, contrast=40.0, emb_shift=0.0, bundle="v1", dim=16, stats=True):
    out = _answers(RNG.beta(2, 5, n), bundle=bundle)
    for a in out:
        if stats:
            a.update(brightness=float(RNG.normal(brightness, 10)), contrast=float(RNG.normal(contrast, 5)),
                     embedding=list(RNG.normal(emb_shift, 1.0, dim)))
    return out


def test_brightness_contrast_and_embedding_against_the_training_sample_by_construction():
    ref = _answers(RNG.beta(2, 5, 400))
    image_ref = {"brightness": RNG.normal(120, 10, 200), "contrast": RNG.normal(40, 5, 200),
                 "embedding": RNG.normal(0.0, 1.0, (200, 16)), "bundle": "v1"}

    def rules(batch):
        rep = check(CFG, ref, {(256, 256)}, batch, image_ref)
        return rep, {r["rule"]: r for r in rep["rules"]}

    rep, r = rules(_logged())
    assert rep["drifted"] is False and all(r[k]["passed"] for k in ("brightness_shift", "contrast_shift",
                                                                     "embedding_shift"))
    assert r["embedding_shift"]["value"] < 0.15  # about 1/sqrt(300) for the same distribution

    rep, r = rules(_logged(brightness=135.0))  # the lamp got brighter: 1.5 training sd
    assert rep["drifted"] and r["brightness_shift"]["passed"] is False and r["contrast_shift"]["passed"]
    assert 1.0 < r["brightness_shift"]["value"] < 2.0

    rep, r = rules(_logged(contrast=55.0))
    assert [k for k, v in r.items() if v["passed"] is False] == ["contrast_shift"]

    rep, r = rules(_logged(emb_shift=1.0))  # every one of 16 dims by 1 sd: |shift| 4 = 1.0 x spread 4
    assert r["embedding_shift"]["passed"] is False and 0.8 < r["embedding_shift"]["value"] < 1.3

    # another bundle's embeddings live in another space; logs from before the statistics: not compared
    rep, r = rules(_logged(emb_shift=3.0, bundle="v2"))
    assert r["embedding_shift"]["passed"] is None and "bundle v1" in r["embedding_shift"]["why"]
    assert rep["drifted"] is False
    rep, r = rules(_logged(stats=False))
    assert {k for k, v in r.items() if v["passed"] is None} == {"brightness_shift", "contrast_shift",
                                                                "embedding_shift"}
    assert "not compared:" in render(rep)


def test_the_training_sample_spans_every_category_in_manifest_order():
    """The reference sample of the image rules covers the whole manifest, not its first rows: the manifest is
    ordered by category, and a sample of the first rows made a batch of both categories look like drift."""
    from edgeqa.drift import reference_sample

    paths = [f"bottle/{i}.png" for i in range(196)] + [f"tile/{i}.png" for i in range(196)]
    s = reference_sample(paths, 200)
    assert len(s) == len(set(s)) == 200 and s[0] == paths[0] and s[-1] == paths[-1]
    assert sum(p.startswith("tile/") for p in s) == 100
    assert reference_sample(paths[:50], 200) == paths[:50]
