"""The teacher's tuned vision and its verdict ensemble: the ensemble ranks val at least as well as either part
and its probabilities follow that ranking; a tuned-vision file that does not fit Lite0 is refused by name."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from edgeqa.errors import StageError
from edgeqa.evaluation.metrics import auroc
from edgeqa.teacher.local import TeacherMeta, anomaly_maps, ensemble_p, load_tuned_vision
from edgeqa.teacher.sft import TeacherVision, fit_ensemble
from edgeqa.teacher.vision_head import (
    HEAD_FILE,
    HeadEnsemble,
    VisionHead,
    head_scores,
    load_head,
    save_head,
    train_head,
    train_heads,
)
from edgeqa.vlm.vision import lite0_maps, load_lite0


def _val(seed=0, n=60):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(int)
    strong = y * 2.0 + rng.normal(0, 0.6, n)
    noise = rng.normal(0, 1, n)
    return y, strong, noise


def test_the_ensemble_leans_on_the_informative_part_and_never_ranks_below_it():
    y, strong, noise = _val()
    for lm, an in ((strong, noise), (noise, strong)):
        lm_z, an_z = (lm - lm.mean()) / lm.std(), (an - an.mean()) / an.std()
        e = fit_ensemble(lm_z, an_z, y)
        s = e["w_lm"] * lm_z + e["w_anomaly"] * an_z
        assert auroc(y, s) >= max(auroc(y, lm_z), auroc(y, an_z)) - 1e-9
        heavy, light = ("w_lm", "w_anomaly") if lm is strong else ("w_anomaly", "w_lm")
        assert e[heavy] > e[light] >= 0, e


def test_ensemble_probabilities_follow_the_fitted_score():
    y, strong, noise = _val(1)
    d = strong * 3.0  # a raw LM logit; the meta's temperature and standardisation map it to lm_z
    meta = TeacherMeta(base_lm_dir="x", image_size=224, grid=4, types=[], locations=[], verdict_temperature=3.0,
                       type_temperature=1.0, anomaly=True, ensemble={}, anomaly_mean=float(noise.mean()),
                       anomaly_std=float(noise.std()), lm_mean=float(strong.mean()), lm_std=float(strong.std()))
    meta.ensemble = fit_ensemble((strong - strong.mean()) / strong.std(), (noise - noise.mean()) / noise.std(), y)
    p = ensemble_p(meta, d, noise)
    assert np.all((p > 0) & (p < 1))
    assert auroc(y, p) >= auroc(y, strong) - 0.05
    assert abs(float(p[y == 1].mean()) - 1) < 0.3 and float(p[y == 0].mean()) < 0.3, "calibrated towards the labels"


@pytest.fixture(scope="module")
def lite0():
    return load_lite0()


def test_cached_trunk_then_upper_blocks_equal_one_full_pass(lite0):
    v = TeacherVision(lite0, 8, [10], 64, 2)
    x = torch.randn(2, 3, 64, 64)
    from edgeqa.vlm.vision import lite0_trunk, pool_tokens

    with torch.no_grad():
        h = lite0_trunk(lite0, x, v.cache_at)
        tok, _ = v.tokens(h)
        mids, final = lite0_maps(lite0, x, [10])
        assert torch.allclose(tok, pool_tokens(final, mids, 2), atol=1e-5)
    tuned = {n for n, q in lite0.named_parameters() if q.requires_grad}
    assert tuned and all(n.startswith(("_blocks.8.", "_blocks.9.", "_blocks.1", "_conv_head", "_bn1")) for n in tuned)
    assert not any(n.startswith(("_blocks.7.", "_conv_stem", "_bn0")) for n in tuned)
    assert set(v.state()) >= {n for n in tuned}


def test_a_tuned_vision_file_that_does_not_fit_lite0_is_refused_by_name(lite0, tmp_path):
    f = tmp_path / "vision.safetensors"
    with pytest.raises(StageError, match="vision.safetensors is missing"):
        load_tuned_vision(f, lite0)
    save_file({"_blocks.99.weight": torch.zeros(2)}, str(f))
    with pytest.raises(StageError, match=r"_blocks\.99\.weight.*not a parameter"):
        load_tuned_vision(f, lite0)
    save_file({"_conv_head.weight": torch.zeros(3, 3)}, str(f))
    with pytest.raises(StageError, match=r"_conv_head\.weight.*shape \(3, 3\)"):
        load_tuned_vision(f, lite0)
    good = {k: v.clone() for k, v in lite0.state_dict().items() if k.startswith("_conv_head")}
    save_file(good, str(f))
    assert set(load_tuned_vision(f, lite0)) == set(good)


def test_the_anomaly_map_is_each_patchs_distance_to_its_nearest_bank_patch():
    rng = np.random.default_rng(3)
    bank = rng.normal(0, 1, (500, 24)).astype(np.float32)
    patches = rng.normal(0, 1, (5, 49, 24)).astype(np.float32)
    patches[0, 7] = bank[42]  # a patch that is in the bank: distance 0
    got = anomaly_maps(patches, bank, rows=64)  # several row chunks, the last one short
    want = np.sqrt(((patches[:, :, None, :] - bank[None, None]) ** 2).sum(-1)).min(-1)
    assert got.shape == (5, 49)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)
    assert got[0, 7] < 2e-3
    assert anomaly_maps(np.zeros((0, 49, 24), np.float32), bank).shape == (0, 49)


def test_cell_evidence_puts_each_patch_in_the_grid_cell_of_its_centre():
    from edgeqa.config import GRID_WORDS
    from edgeqa.data.maskfacts import grid_word
    from edgeqa.teacher.local import cell_evidence

    side = 14  # the teacher's stride-16 map at 224 px
    for r, c in [(0, 0), (4, 4), (5, 9), (13, 13), (7, 0), (9, 10)]:
        m = np.zeros((1, side * side), np.float32)
        m[0, r * side + c] = 5.0
        cells = cell_evidence(m)
        want = GRID_WORDS.index(grid_word(r + 0.5, c + 0.5, side, side))  # a mask centroid's own rule
        assert int(cells[0].argmax()) == want and cells[0, want] == 5.0
        assert np.all(np.delete(cells[0], want) == 0.0)
    with pytest.raises(StageError, match="square grid"):
        cell_evidence(np.zeros((1, 10), np.float32))


def test_the_location_weight_is_chosen_on_val_and_stays_zero_when_the_map_does_not_pay():
    from edgeqa.teacher.sft import fit_evidence_weight

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 9, 40)
    lm = rng.normal(0, 1, (40, 9))  # an LM that does not know where the defect is
    lm[np.arange(40)[:10], truth[:10]] += 3.0  # except on a quarter of the images
    good_map = rng.normal(0, 0.3, (40, 9))
    good_map[np.arange(40), truth] += 2.0  # a map whose highest cell is the defect's
    w, acc = fit_evidence_weight(lm, good_map, truth)
    assert w > 0 and acc["ensemble"] > acc["lm"] and acc["ensemble"] >= acc["anomaly"] - 0.05
    noise = rng.normal(0, 1, (40, 9))  # a map that knows nothing
    lm_good = lm.copy()
    lm_good[np.arange(40), truth] += 10.0  # an LM that always knows
    w0, acc0 = fit_evidence_weight(lm_good, noise, truth)
    assert acc0["ensemble"] == acc0["lm"] == 1.0 and w0 == 0.0
    with pytest.raises(StageError, match="no defective val image"):
        fit_evidence_weight(np.zeros((0, 9)), np.zeros((0, 9)), np.zeros(0, int))


def test_the_location_bias_favours_the_cell_where_the_map_is_highest():
    from edgeqa.teacher.local import location_bias

    meta = TeacherMeta(base_lm_dir="x", image_size=224, grid=4, types=["crack"], locations=[], verdict_temperature=1,
                       type_temperature=1, anomaly=True, ensemble={}, anomaly_mean=0.0, anomaly_std=2.0,
                       location_anomaly_weight=4.0)
    cells = np.zeros((2, 9), np.float32)
    cells[0, 2], cells[1, 7] = 1.0, 1.0
    b = location_bias(meta, cells)
    assert b.argmax(1).tolist() == [2, 7]
    assert np.allclose(b.mean(1), 0.0) and np.isclose(b[0, 2] - b[0, 0], 4.0 * 1.0 / 2.0)


def test_type_evidence_votes_for_the_type_of_the_nearest_defect_patches(tmp_path):
    from PIL import Image

    from edgeqa.teacher.local import mask_cells, type_evidence

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 16)).astype(np.float32)  # three defect types, far apart in feature space
    bank = np.concatenate([c + rng.normal(0, 0.1, (20, 16)) for c in centres]).astype(np.float32)
    of = np.repeat(np.arange(3), 20)
    patches = rng.normal(0, 0.1, (3, 9, 16)).astype(np.float32)  # one image per type, a defect patch at 4
    maps = np.zeros((3, 9), np.float32)
    for i in range(3):
        patches[i, 4] = centres[i]
        maps[i, 4] = 1.0
    ev = type_evidence(maps, patches, bank, of, 3, top=1, neighbours=5)
    assert ev.argmax(1).tolist() == [0, 1, 2]
    assert np.allclose(np.exp(ev).sum(1), 1.0)  # smoothed shares
    m = np.zeros((64, 64), np.uint8)
    m[40:64, 0:10] = 255  # the lower left
    Image.fromarray(m).save(tmp_path / "m.png")
    cells = mask_cells(tmp_path / "m.png", 4).reshape(4, 4)
    assert cells[2:, 0].all() and cells[:2].sum() == 0 and cells[:, 2:].sum() == 0


def test_a_three_part_ensemble_leans_on_the_informative_part_and_needs_every_part_it_was_fitted_with():
    y, strong, noise = _val(2)
    rng = np.random.default_rng(3)
    z = lambda v: (v - v.mean()) / v.std()  # noqa: E731
    weak = y * 0.5 + rng.normal(0, 1, len(y))
    e = fit_ensemble(z(noise), z(weak), y, z(strong))
    s = e["w_lm"] * z(noise) + e["w_anomaly"] * z(weak) + e["w_head"] * z(strong)
    assert auroc(y, s) >= auroc(y, strong) - 1e-9
    assert e["w_head"] > e["w_anomaly"] >= 0 and e["w_head"] > e["w_lm"] >= 0, e
    e2 = fit_ensemble(z(noise), None, y, z(strong))  # anomaly evidence off, the head on
    assert e2["w_anomaly"] == 0.0 and e2["w_head"] > e2["w_lm"], e2
    meta = TeacherMeta(base_lm_dir="x", image_size=224, grid=4, types=[], locations=[], verdict_temperature=1.0,
                       type_temperature=1.0, anomaly=True, ensemble=e, anomaly_mean=float(weak.mean()),
                       anomaly_std=float(weak.std()), lm_mean=float(noise.mean()), lm_std=float(noise.std()),
                       vision_head={"grid": 2, "hidden": 8, "n_types": 0}, head_mean=float(strong.mean()),
                       head_std=float(strong.std()))
    p = ensemble_p(meta, noise, weak, strong)
    assert np.allclose(p, 1 / (1 + np.exp(-(s + e["bias"]))))
    with pytest.raises(StageError, match="vision head's logits"):
        ensemble_p(meta, noise, weak, None)


def _h7(n, seed=0):
    """Block-7-shaped maps (80 channels, 8x8); a defective one has a bright 2x2 spot somewhere."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 80, 8, 8, generator=g) * 0.5
    y = (torch.arange(n) % 2).numpy()
    for i in np.flatnonzero(y):
        r, c = torch.randint(0, 7, (2,), generator=g).tolist()
        h[i, :, r:r + 2, c:c + 2] += 3.0
    return h, y


def test_the_vision_head_learns_a_verdict_and_round_trips_through_its_file(lite0, tmp_path):
    torch.manual_seed(0)
    h, y = _h7(64)
    types = np.where(y == 1, np.arange(64) % 4 // 2 + 0, -1)  # two types among the defective rows (0 and 1)
    head = VisionHead.from_backbone(lite0, 2, 3, 32)
    before = head_scores(head, h[:8])[0]
    train_head(head, h, y, types, steps=40, lr=2e-3, lr_vision=5e-4, batch_size=16, seed=0)
    hv, y_va = _h7(32, seed=1)
    v, t = head_scores(head, hv)
    assert auroc(y_va, v) >= 0.9, auroc(y_va, v)
    assert t.shape == (32, 2) and np.allclose(np.exp(t).sum(1), 1, atol=1e-5)
    assert not np.allclose(before, head_scores(head, h[:8])[0]), "trained"
    assert all(torch.equal(a, b) for a, b in zip(lite0.state_dict().values(), load_lite0().state_dict().values())), \
        "the backbone's own blocks are copied, never trained"
    f, one = tmp_path / HEAD_FILE, HeadEnsemble([head])
    save_head(one, f)
    again = load_head(f, lite0, one.config())
    assert np.array_equal(head_scores(again, hv)[0], v)
    with pytest.raises(StageError, match="vision_head.safetensors is missing"):
        load_head(tmp_path / "nope" / HEAD_FILE, lite0, one.config())
    state = {k: v.clone() for k, v in one.state_dict().items()}
    state["heads.0.verdict.weight"] = torch.zeros(3, 3)
    save_file(state, str(f))
    with pytest.raises(StageError, match=r"verdict\.weight.*shape \(3, 3\)"):
        load_head(f, lite0, one.config())
    with pytest.raises(StageError, match=r"heads\.1\..* of the vision head are missing"):
        save_head(one, f)
        load_head(f, lite0, {**one.config(), "members": 2})
    with pytest.raises(StageError, match="needs good and defective"):
        train_head(head, h[y == 1], y[y == 1], types[y == 1], 5, 1e-3, 1e-3, 8, 0)


def test_a_head_ensemble_is_the_mean_of_members_trained_from_their_own_seeds(lite0, tmp_path):
    h, y = _h7(48)
    types = np.where(y == 1, np.arange(48) % 4 // 2, -1)
    ens = HeadEnsemble.from_backbone(lite0, 2, 3, 16, members=2)
    curve = train_heads(ens, h, y, types, steps=20, lr=2e-3, lr_vision=5e-4, batch_size=16, seed=3)
    assert [c["step"] for c in curve] == [10, 20] and ens.config()["members"] == 2
    hv, _ = _h7(16, seed=1)
    (v0, t0), (v1, t1) = head_scores(ens.heads[0], hv), head_scores(ens.heads[1], hv)
    assert not np.allclose(v0, v1), "each member starts from its own seed"
    v, t = head_scores(ens, hv)
    assert np.allclose(v, (v0 + v1) / 2, atol=1e-5)
    mean_lp = (t0 + t1) / 2
    assert np.allclose(t, mean_lp - np.log(np.exp(mean_lp).sum(1, keepdims=True)), atol=1e-5)
    assert np.allclose(np.exp(t).sum(1), 1, atol=1e-5)
    single = VisionHead.from_backbone(lite0, 2, 3, 16)
    train_head(single, h, y, types, steps=20, lr=2e-3, lr_vision=5e-4, batch_size=16, seed=4)
    assert np.allclose(head_scores(single, hv)[0], v1, atol=1e-5), "member i is the head of seed `seed + i`"
    save_head(ens, tmp_path / HEAD_FILE)
    again = load_head(tmp_path / HEAD_FILE, lite0, ens.config())
    assert len(again.heads) == 2 and np.array_equal(head_scores(again, hv)[0], v)


def test_the_head_trains_its_blocks_even_from_a_frozen_backbone():
    """teacher_sft freezes Lite0 (vision_tune_from: null) before the head copies blocks 8..10; the copies must still
    train (they once did not: the stage's magnetic-tile heads trained their MLP only)."""
    frozen = load_lite0().requires_grad_(False)
    head = VisionHead.from_backbone(frozen, 0, 3, 16)
    assert all(q.requires_grad for q in head.parameters())
    before = [q.detach().clone() for q in head.blocks.parameters()]
    h, y = _h7(32)
    train_head(head, h, y, np.full(32, -1), steps=5, lr=2e-3, lr_vision=5e-4, batch_size=16, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, head.blocks.parameters())), "the blocks trained"
    assert not any(q.requires_grad for q in frozen.parameters()), "the backbone stays frozen"
