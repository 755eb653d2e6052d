"""Speculative decoding of the reason (edgeqa.vlm.draft, Context.generate with a drafter): the n-gram drafts, and
the promise that drafting changes how many LM passes a reason takes, never which tokens or scores it gets."""

from __future__ import annotations

import json

import pytest
import torch

from edgeqa.errors import StageError
from edgeqa.vlm.draft import NgramDrafter
from edgeqa.vlm.model import Context


def test_the_drafter_continues_the_longest_seen_suffix_with_its_most_frequent_next_token():
    d = NgramDrafter([[1, 2, 3, 4], [1, 2, 3, 5], [7, 2, 3, 5]], n=3)
    assert d.draft([9, 2, 3], 3) == [5]  # (2, 3) was followed by 5 twice and by 4 once; nothing follows 5
    assert d.draft([1, 2, 3], 1) == [4]  # (1, 2, 3): 4 and 5 once each, and a tie goes to the smaller id
    # a longer suffix wins over a more frequent shorter one: (9, 1) -> 2 beats (1) -> 3, seen twice
    d3 = NgramDrafter([[9, 1, 2], [8, 1, 3], [8, 1, 3]], n=2)
    assert d3.draft([9, 1], 1) == [2]
    assert d3.draft([5, 1], 1) == [3]
    # drafting goes on from its own guesses, and stops where nothing was seen
    assert NgramDrafter([[1, 2, 3, 4]], n=2).draft([1], 10) == [2, 3, 4]
    assert NgramDrafter([[1, 2]], n=2).draft([6], 4) == []
    with pytest.raises(ValueError, match="n must be"):
        NgramDrafter([[1, 2]], n=0)


def _lm() -> torch.nn.Module:
    """A small random Llama: the decoding arithmetic under test does not depend on what the weights know."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _run(lm, embeds, tails, max_new, min_new, stops, drafter=None, k=0):
    ctx = Context(lm, 0, embeds)
    toks, scores = ctx.generate(tails, max_new, min_new, stops, drafter, k)
    out = []
    for i in range(len(tails)):
        ids = toks[i].tolist()
        n = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))  # the stop is kept
        out.append((ids[:n], torch.stack([scores[j][i] for j in range(n)]) if n else torch.zeros(0)))
    return out


@pytest.mark.parametrize("min_new", [0, 6])
def test_drafted_decoding_gives_the_greedy_tokens_and_scores(min_new):
    lm = _lm()
    torch.manual_seed(1)
    embeds = torch.randn(3, 5, 32)
    tails = [[3, 4], [5], [6, 7, 8]]
    plain = _run(lm, embeds, tails, 12, 0, [])
    # a stop token that greedy decoding reaches in a row (so rows end at different steps)
    stop = plain[0][0][3]
    stops = [stop, 47]
    ref = _run(lm, embeds, tails, 12, min_new, stops)
    assert any(len(t) < 12 for t, _ in ref) or min_new, "the stop must end a row early, to test a row that ends"
    right = NgramDrafter([[*tl, *t] for tl, (t, _) in zip(tails, ref)], n=3)   # drafts that are all kept
    wrong = NgramDrafter([[(t * 7 + 3) % 48 for t in range(40)]], n=1)          # drafts mostly rejected
    half = NgramDrafter([[*tl, *t[:4], 1, 2, 9] for tl, (t, _) in zip(tails, ref)], n=3)  # kept, then rejected
    for drafter in (right, wrong, half):
        for k in (1, 3, 8):
            got = _run(lm, embeds, tails, 12, min_new, stops, drafter, k)
            for (t_ref, s_ref), (t_got, s_got) in zip(ref, got):
                assert t_got == t_ref, (k, t_ref, t_got)
                torch.testing.assert_close(s_got, s_ref, atol=1e-4, rtol=1e-4)


def test_drafted_decoding_takes_fewer_lm_passes_when_the_drafts_are_right():
    lm = _lm()
    torch.manual_seed(1)
    embeds = torch.randn(2, 5, 32)
    tails = [[3, 4], [5]]
    ref = _run(lm, embeds, tails, 16, 0, [])
    passes = []
    forward = lm.forward

    def counted(*a, **kw):
        passes.append(1)
        return forward(*a, **kw)

    lm.forward = counted
    _run(lm, embeds, tails, 16, 0, [], NgramDrafter([[*tl, *t] for tl, (t, _) in zip(tails, ref)], n=3), 8)
    drafted = len(passes)
    passes.clear()
    _run(lm, embeds, tails, 16, 0, [])
    # the prompt pass, the tails' pass, then 15 one-token passes for 16 tokens; drafted: 2 passes of 8 checks
    assert drafted <= 5 < len(passes), (drafted, len(passes))


def test_a_teacher_folder_refuses_a_missing_or_foreign_drafts_file(tmp_path):
    from edgeqa.teacher.local import DRAFTS_FILE, load_drafter

    f = tmp_path / DRAFTS_FILE
    with pytest.raises(StageError, match="missing.*draft_tokens"):
        load_drafter(f, 100)
    f.write_text("{not json")
    with pytest.raises(StageError, match="not readable JSON"):
        load_drafter(f, 100)
    f.write_text(json.dumps({"n": 3, "sequences": [[1, 2, 500]]}))
    with pytest.raises(StageError, match=r"not a drafts file.*\[0, 100\)"):
        load_drafter(f, 100)
    f.write_text(json.dumps({"n": 2, "sequences": [[1, 2, 3]]}))
    assert load_drafter(f, 100).draft([1], 2) == [2, 3]


def test_finished_rows_leave_the_batch_and_the_spent_context_refuses_more_questions():
    lm = _lm()
    torch.manual_seed(1)
    embeds = torch.randn(3, 5, 32)
    tails = [[3, 4], [5], [6, 7, 8]]
    plain = _run(lm, embeds, tails, 12, 0, [])
    stops = [plain[0][0][2]]  # row 0 stops after 3 tokens (the others may too, later or never)
    ref = _run(lm, embeds, tails, 12, 0, stops)
    lengths = sorted(len(t) for t, _ in ref)
    assert lengths[0] < lengths[-1], "rows must end at different steps"
    rows_fed: list[int] = []
    forward = lm.forward

    def counted(*a, **kw):
        ids = kw.get("input_ids")
        rows_fed.append(len(ids) if ids is not None else len(kw["inputs_embeds"]))
        return forward(*a, **kw)

    lm.forward = counted
    ctx = Context(lm, 0, embeds)
    drafter = NgramDrafter([[(t * 7 + 3) % 48 for t in range(40)]], n=1)  # mostly rejected: many passes
    toks, scores = ctx.generate(tails, 12, 0, stops, drafter, 2)
    for i, (t_ref, s_ref) in enumerate(ref):
        assert toks[i, :len(t_ref)].tolist() == t_ref
        torch.testing.assert_close(torch.stack([scores[j][i] for j in range(len(t_ref))]), s_ref,
                                   atol=1e-4, rtol=1e-4)
    assert rows_fed[:2] == [3, 3] and min(rows_fed) < 3, rows_fed  # the prompt, the tails, then fewer rows
    with pytest.raises(StageError, match="make a new Context"):
        ctx.extend([[1]] * 3)


def test_a_shared_prefix_run_once_gives_every_row_what_the_whole_prompt_gives():
    lm = _lm()
    torch.manual_seed(2)
    shared, rest = torch.randn(6, 32), torch.randn(3, 5, 32)
    whole = Context(lm, 0, torch.cat([shared.expand(3, -1, -1), rest], 1))
    once = Context(lm, 0, rest, shared=shared)
    tails = [[3, 4], [5], [6, 7, 8]]
    torch.testing.assert_close(once.extend(tails), whole.extend(tails), atol=1e-5, rtol=1e-5)
    assert once.mask.shape == whole.mask.shape
    a, b = Context(lm, 0, rest, shared=shared), Context(lm, 0, torch.cat([shared.expand(3, -1, -1), rest], 1))
    ta, sa = a.generate(tails, 10, 0, [])
    tb, sb = b.generate(tails, 10, 0, [])
    assert ta.tolist() == tb.tolist()
    torch.testing.assert_close(torch.stack(sa), torch.stack(sb), atol=1e-4, rtol=1e-4)


def _vlm(shared: bool):
    from edgeqa.vlm.model import Layout, Projector, ProjectorConfig, VisionLM
    from edgeqa_runtime.schema import AnswerSchema

    lm = _lm()
    torch.manual_seed(4)
    proj = Projector(ProjectorConfig(in_dim=8, n_tokens=2, lm_hidden=32, hidden=16)).eval()
    layout = Layout(pre=[1, 2, 3, 4, 5, 6], post=[7, 8], field_ids={}, options={}, end=47,
                    schema=AnswerSchema(types=(), locations=()), stops=[47], shared_prefix=shared)
    return VisionLM(lm, None, proj, layout)


def test_training_with_a_shared_prefix_gives_the_same_answer_logits_and_gradients():
    torch.manual_seed(5)
    tokens = torch.randn(3, 2, 8)
    seqs = [([9, 10, 11, 47], [0, 1, 0, 0]), ([12, 47], [1, 0]), ([13, 14, 15, 16, 47], [0, 0, 1, 1, 0])]
    got = []
    for shared in (False, True):
        vlm = _vlm(shared)
        logits, tgt, w, prefix = vlm.answer_logits(tokens, seqs, 5.0)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 48), tgt.reshape(-1), ignore_index=-100,
                                               reduction="none").view_as(w)
        loss = (ce * w).sum() / w.sum()
        loss.backward()
        rows = [logits[r, prefix - 1:prefix - 1 + len(ids)] for r, (ids, _) in enumerate(seqs)]
        grads = [p.grad.clone() for p in vlm.lm.parameters()] + [p.grad.clone() for p in vlm.projector.parameters()
                                                                   if p.grad is not None]
        got.append((rows, float(loss.detach()), grads, prefix))
    (r0, l0, g0, p0), (r1, l1, g1, p1) = got
    assert p1 == p0 - 6  # the shared columns are not returned
    for a, b in zip(r0, r1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert abs(l0 - l1) < 1e-5
    assert len(g0) == len(g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_shared_prefix_layout_answers_as_the_whole_prompt_does():
    torch.manual_seed(6)
    tokens = torch.randn(3, 2, 8)
    tails = [[9, 10], [11], [12, 13, 14]]
    a = _vlm(False).context(tokens).generate(tails, 8, 0, [47])
    b = _vlm(True).context(tokens).generate(tails, 8, 0, [47])
    assert a[0].tolist() == b[0].tolist()
    torch.testing.assert_close(torch.stack(b[1]), torch.stack(a[1]), atol=1e-4, rtol=1e-4)
