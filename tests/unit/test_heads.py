import torch

from edgeqa.vlm.heads import AnswerHeads
from edgeqa_runtime.schema import Answer, AnswerSchema

SCHEMA = AnswerSchema.for_dataset(["crack", "hole"], True)
ANSWERS = [Answer("defective", "hole", "upper left", "r"), Answer("good", None, None, "r"),
           Answer("defective", "crack", "center", "r")]


def test_targets_index_the_schema_and_mark_missing_fields():
    h = AnswerHeads(8, SCHEMA)
    y = h.targets(ANSWERS)
    assert y["verdict"].tolist() == [1, 0, 1]
    assert y["defect_type"].tolist() == [1, -100, 0]
    assert y["location"].tolist() == [SCHEMA.locations.index("upper left"), -100, SCHEMA.locations.index("center")]


def test_a_dataset_without_types_or_masks_gets_a_verdict_head_only():
    h = AnswerHeads(8, AnswerSchema.for_dataset(None, False))
    assert set(h.heads) == {"verdict"} and set(h.targets(ANSWERS)) == {"verdict"}


def test_equal_weights_give_the_unweighted_loss_and_weights_shift_it():
    torch.manual_seed(0)
    h = AnswerHeads(8, SCHEMA)
    e = torch.randn(3, 5, 8)
    y = h.targets(ANSWERS)
    plain = h.loss(e, y)
    assert torch.allclose(plain, h.loss(e, y, torch.full((3,), 2.0)))
    assert not torch.allclose(plain, h.loss(e, y, torch.tensor([1.0, 0.1, 5.0])))


def test_training_the_heads_makes_the_answer_readable_from_the_max_token():
    """A defect lighting one of 16 tokens: the heads (and the embeddings under them) learn the verdict."""
    torch.manual_seed(0)
    n, tokens, dim = 64, 16, 8
    y = torch.arange(n) % 2
    e = torch.randn(n, tokens, dim) * 0.1
    e[y == 1, 3, 0] += 3.0
    answers = [Answer("defective", "crack", "center", "r") if v else Answer("good", None, None, "r") for v in y]
    h = AnswerHeads(dim, SCHEMA)
    opt = torch.optim.Adam(h.parameters(), lr=0.05)
    t = h.targets(answers)
    first = h.loss(e, t).item()
    for _ in range(100):
        loss = h.loss(e, t)
        loss.backward()
        opt.step()
        opt.zero_grad()
    z = torch.cat([e.mean(1), e.amax(1)], -1)
    acc = float((h.heads["verdict"](z).argmax(1) == y).float().mean())
    assert h.loss(e, t).item() < first / 3 and acc == 1.0


def test_fields_choose_the_heads_and_unknown_fields_are_refused():
    assert set(AnswerHeads(8, SCHEMA, ("verdict",)).heads) == {"verdict"}
    assert set(AnswerHeads(8, SCHEMA, ("verdict", "location")).heads) == {"verdict", "location"}
    import pytest

    with pytest.raises(ValueError, match="allowed: verdict"):
        AnswerHeads(8, SCHEMA, ("verdict", "colour"))
