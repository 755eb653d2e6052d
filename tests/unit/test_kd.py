"""The distillation loss and its targets (edgeqa.student.kd): known values, temperature, masking, vocabulary,
and `DistillLoss`, the one object every student stage trains with."""

import math

import pytest
import torch

from edgeqa.student.kd import DistillLoss, kd_kl, kd_loss, option_targets, restrict


def _row(teacher_p, student_logits):
    ids = torch.arange(len(teacher_p)).unsqueeze(0)
    lp = torch.tensor([[math.log(p) for p in teacher_p]])
    return torch.tensor([student_logits], dtype=torch.float), ids, lp


def test_known_value_at_temperature_1():
    # teacher (0.75, 0.25) on ids 0, 1; student uniform over 3 ids:
    # KL = 0.75 ln(0.75 * 3) + 0.25 ln(0.25 * 3) = 0.536280
    s, ids, lp = _row([0.75, 0.25], [0.0, 0.0, 0.0])
    assert kd_kl(s, ids, lp, 1.0).item() == pytest.approx(0.536280, abs=1e-5)


def test_temperature_softens_the_teacher_and_scales_by_t_squared():
    # T = 2: teacher softmax(log p / 2) = (0.633975, 0.366025); student still uniform;
    # KL = 0.441806, times T^2 = 1.767224
    s, ids, lp = _row([0.75, 0.25], [0.0, 0.0, 0.0])
    assert kd_kl(s, ids, lp, 2.0).item() == pytest.approx(1.767224, abs=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        kd_kl(s, ids, lp, 0.0)


def test_agrees_with_torch_kl_div_on_random_rows():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 7, generator=g)
    t = torch.log_softmax(torch.randn(4, 7, generator=g), -1)
    ids = torch.arange(7).repeat(4, 1)
    for temp in (1.0, 3.0):
        want = torch.nn.functional.kl_div(torch.log_softmax(s / temp, -1), torch.softmax(t / temp, -1),
                                          reduction="none").sum(-1) * temp ** 2
        assert torch.allclose(kd_kl(s, ids, t, temp), want, atol=1e-6)


def test_zero_when_the_student_matches_and_padding_counts_for_nothing():
    s, ids, lp = _row([0.5, 0.5], [2.0, 2.0, -30.0])
    assert kd_kl(s, ids, lp, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    padded_ids = torch.tensor([[0, 1, 2]])
    padded_lp = torch.tensor([[math.log(0.75), math.log(0.25), float("-inf")]])
    s2, ids2, lp2 = _row([0.75, 0.25], [0.3, -0.2, 1.0])
    assert kd_kl(s2, padded_ids, padded_lp, 2.0).item() == pytest.approx(kd_kl(s2, ids2, lp2, 2.0).item(), abs=1e-6)


def test_only_masked_positions_count():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    ids = torch.randint(0, 6, (2, 5, 3), generator=g)
    lp = torch.log_softmax(torch.randn(2, 5, 3, generator=g), -1)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    loss = kd_loss(logits, mask, ids, lp, 2.0)
    loss.backward()
    grad_off = logits.grad.clone()
    grad_off[0, 1] = 0
    grad_off[1, 3] = 0
    assert torch.count_nonzero(grad_off) == 0, "no gradient reaches a non-answer position"
    assert logits.grad[0, 1].abs().sum() > 0 and logits.grad[1, 3].abs().sum() > 0
    changed = logits.detach().clone()
    changed[:, 0] += 5.0  # a non-answer position
    assert kd_loss(changed, mask, ids, lp, 2.0).item() == pytest.approx(loss.item(), abs=1e-6)
    want = (kd_kl(logits[0, 1:2], ids[0, 1:2], lp[0, 1:2], 2.0)
            + kd_kl(logits[1, 3:4], ids[1, 3:4], lp[1, 3:4], 2.0)) / 2
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert kd_loss(logits, torch.zeros_like(mask), ids, lp, 2.0).item() == 0.0


def test_row_weights_weight_the_mean():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 4, generator=g)
    ids = torch.tensor([[[0, 1]], [[2, 3]]])
    lp = torch.log(torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]]))
    mask = torch.ones(2, 1, dtype=torch.bool)
    a = kd_kl(logits[0], ids[0], lp[0], 1.0).item()
    b = kd_kl(logits[1], ids[1], lp[1], 1.0).item()
    got = kd_loss(logits, mask, ids, lp, 1.0, torch.tensor([3.0, 1.0])).item()
    assert got == pytest.approx((3 * a + b) / 4, abs=1e-6)


def test_targets_restricted_to_the_student_vocabulary_report_the_dropped_mass():
    r = restrict([10, 20, 30], [math.log(0.6), math.log(0.3), math.log(0.1)], {10: 0, 30: 1})
    assert r.ids == [0, 1]
    assert r.dropped == pytest.approx(0.3)
    # renormalised inside kd_kl: 0.6 and 0.1 become 6/7 and 1/7
    s = torch.tensor([[math.log(6 / 7), math.log(1 / 7)]])
    assert kd_kl(s, torch.tensor([r.ids]), torch.tensor([r.logprobs]), 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_option_targets_pool_options_sharing_a_first_token():
    ids, lps = option_targets({"upper left": 0.2, "upper right": 0.3, "top": 0.5},
                              ["upper left", "upper right", "top"], [[7, 1], [7, 2], [9]])
    got = dict(zip(ids, [math.exp(x) for x in lps]))
    assert got == pytest.approx({7: 0.5, 9: 0.5})


def _one_token_batch():
    """Two rows, answers of one token at column 1 (prefix 2: answer token 0 sits at position 2, so its target
    is predicted by logit column 1); vocabulary of 3."""
    logits = torch.zeros(2, 3, 3)
    logits[0, 1] = torch.tensor([0.0, 0.0, 0.0])          # uniform: CE of any target = ln 3
    logits[1, 1] = torch.tensor([math.log(3.0), 0.0, 0.0])  # p(0) = 3/5
    targets = torch.full((2, 3), -100)
    targets[:, 1] = 0
    weights = torch.zeros(2, 3)
    weights[0, 1], weights[1, 1] = 1.0, 3.0
    return logits, targets, weights


def test_distill_loss_is_weighted_ce_when_alpha_is_zero():
    logits, targets, weights = _one_token_batch()
    # (1 * ln 3 + 3 * -ln(3/5)) / 4 = (1.098612 + 1.532476) / 4 = 0.657772
    assert DistillLoss()(logits, targets, weights, prefix=2).item() == pytest.approx(0.657772, abs=1e-5)
    kd = [[(1, [0, 1], [math.log(0.75), math.log(0.25)])], []]
    assert DistillLoss(alpha=0.0, temperature=2.0)(logits, targets, weights, 2, kd, [1.0, 3.0]).item() == \
        pytest.approx(0.657772, abs=1e-5), "alpha 0: the KD targets change nothing"


def test_distill_loss_mixes_ce_and_kd_at_the_answer_positions():
    logits, targets, weights = _one_token_batch()
    # row 0 has a target for answer token 1 (logit column prefix + 1 - 1 = 2): teacher (0.75, 0.25) on ids 0, 1;
    # the student is uniform there (logits row 0, column 2 are zeros): T=1 KL = 0.536280 (see above).
    kd = [[(1, [0, 1], [math.log(0.75), math.log(0.25)])], []]
    got = DistillLoss(alpha=0.25, temperature=1.0)(logits, targets, weights, 2, kd, [1.0, 3.0]).item()
    assert got == pytest.approx(0.75 * 0.657772 + 0.25 * 0.536280, abs=1e-5)
    # T = 2 scales the KL by T^2 after softening (1.767224, above)
    got2 = DistillLoss(alpha=0.5, temperature=2.0)(logits, targets, weights, 2, kd, [1.0, 3.0]).item()
    assert got2 == pytest.approx(0.5 * 0.657772 + 0.5 * 1.767224, abs=1e-5)
    ids, lps, mask = DistillLoss.place(kd, (2, 3), prefix=2)
    assert mask.tolist() == [[False, False, True], [False, False, False]]
    assert ids[0, 2].tolist() == [0, 1] and lps[1].isinf().all()


def test_distill_loss_refuses_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        DistillLoss(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillLoss(alpha=0.5, temperature=0.0)


def test_a_temperature_is_not_fitted_on_a_val_that_cannot_support_it():
    import numpy as np

    from edgeqa.errors import StageError
    from edgeqa.vlm.model import fit_temperature

    z = np.array([2.0, -1.0, 0.5, -3.0])
    assert 0.05 <= fit_temperature(z, np.array([1, 0, 1, 0]), binary=True) <= 20.0
    for bad in (np.array([1, 1, 1, 1]), np.array([0, 0, 0, 0])):
        with pytest.raises(StageError, match="4 images, [04] defective; it needs defective and good"):
            fit_temperature(z, bad, binary=True)
    with pytest.raises(StageError, match="0 images"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int), binary=False)
