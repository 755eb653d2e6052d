"""Stage `prune`: torch-pruning groups on the student, the schedule, the budget back-off, and the exact
`save_pretrained` / `from_pretrained` round trip of a pruned model."""

from __future__ import annotations

import json

import pytest
import torch


def _student(arch: str = "llama", heads: int = 4):
    from edgeqa.student.model import StudentModel, StudentModelConfig, decoder_config_dict

    torch.manual_seed(0)
    dec = decoder_config_dict(arch, 40, 32, 2, heads, 64, 128, pad_id=0, eos_id=0)
    cfg = StudentModelConfig(vision_blocks=11, frozen_blocks=8, image_size=96, grid=3, projector_hidden=32,
                             decoder=dec, vocab_map=list(range(40)), types=["crack"], locations=["left"])
    return StudentModel(cfg).eval()


def _outputs(model, px):
    with torch.no_grad():
        emb = model.image_embeds(px)
        return emb, model.decoder(inputs_embeds=emb).logits


def test_pruned_student_round_trips_exactly_through_save_and_from_pretrained(tmp_path):
    from edgeqa.compress.prune import Widths, apply_widths, widths_of
    from edgeqa.student.model import StudentModel

    m = _student()
    before = widths_of(m)
    assert before == Widths({8: 480, 9: 672, 10: 672}, 32, 64, 4)
    apply_widths(m, Widths({8: 240, 9: 336, 10: 336}, 16, 32, 2))
    assert widths_of(m) == Widths({8: 240, 9: 336, 10: 336}, 16, 32, 2)
    assert m.config.block_widths == {"8": 240, "9": 336, "10": 336}
    assert m.config.decoder["intermediate_size"] == 32 and m.config.decoder["num_attention_heads"] == 2
    assert m.decoder.model.layers[0].self_attn.q_proj.out_features == 2 * 8, "head_dim (32 / 4 heads) is kept"
    px = torch.rand(2, 3, 96, 96)
    want = _outputs(m, px)
    m.save_pretrained(tmp_path / "p")
    back = StudentModel.from_pretrained(tmp_path / "p").eval()
    assert widths_of(back) == widths_of(m)
    sd, bd = m.state_dict(), back.state_dict()
    assert sd.keys() == bd.keys()
    for k in sd:
        assert torch.equal(sd[k], bd[k]), k
    for w, g in zip(want, _outputs(back, px)):
        assert torch.equal(w, g)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["decoder"]["head_dim"] == 8


def test_pruning_removes_the_least_important_channels_and_heads():
    """GroupMagnitudeImportance: channels (and heads) whose whole group is zero go first."""
    from edgeqa.compress.prune import Widths, apply_widths, widths_of

    m = _student()
    mlp = m.decoder.model.layers[0].mlp
    attn = m.decoder.model.layers[0].self_attn
    blk = m.vision.blocks[9]
    with torch.no_grad():
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[:20] = 0
        mlp.down_proj.weight[:, :20] = 0
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight[8:24] = 0  # heads 1 and 2 (head_dim 8)
        attn.o_proj.weight[:, 8:24] = 0
        blk._expand_conv.weight[:100] = 0
        blk._bn0.weight[:100] = 0
        blk._bn0.bias[:100] = 0
        blk._depthwise_conv.weight[:100] = 0
        blk._bn1.weight[:100] = 0
        blk._bn1.bias[:100] = 0
        blk._project_conv.weight[:, :100] = 0
        kept_head0 = attn.q_proj.weight[:8].clone()
    w = widths_of(m)
    apply_widths(m, Widths({**w.blocks, 9: 572}, w.projector, 44, 2))
    assert (mlp.gate_proj.weight.abs().sum(1) > 0).all(), "the 20 zero channels were the ones removed"
    assert (mlp.down_proj.weight.abs().sum(0) > 0).all()
    assert torch.equal(attn.q_proj.weight[:8], kept_head0), "heads 0 and 3 stay, in order"
    assert (attn.q_proj.weight.abs().sum(1) > 0).all()
    assert (blk._expand_conv.weight.flatten(1).abs().sum(1) > 0).all()
    assert m.decoder.model.layers[1].mlp.gate_proj.out_features == 44, "every layer to the same width"


def test_gpt2_decoder_is_refused_with_the_keys_to_change():
    from edgeqa.compress.prune import Widths, apply_widths, widths_of
    from edgeqa.errors import StageError

    m = _student("gpt2")
    w = widths_of(m)
    with pytest.raises(StageError, match=r"student.decoder.arch: llama.*prune.head_ratio|prune.mlp_ratio"):
        apply_widths(m, Widths(w.blocks, w.projector, 32, w.heads))
    apply_widths(m, Widths({i: v // 2 for i, v in w.blocks.items()}, w.projector // 2, w.mlp, w.heads))  # trunk ok


def test_schedule_removes_k_over_steps_of_each_ratio_rounded_to_eights():
    from edgeqa.compress.prune import Widths, target_widths
    from edgeqa.config import PruneConfig

    cfg = PruneConfig.model_validate({
        "source": "best", "steps": 2, "trunk_ratio": 0.5, "projector_ratio": 0.5, "mlp_ratio": 0.5, "head_ratio": 0.25,
        "recovery": {"teacher": "source", "steps": 1, "lr": 1e-3, "lr_vision": 0,
                     "weights": {"human": 1, "teacher": 1}, "alpha": 0.5, "temperature": 2, "top_k": 5},
        "max_auroc_drop": 0.03, "bootstrap": 10, "latency_images": 1, "max_reason_tokens": 4, "seed": 0,
        "threads": 1})
    orig = Widths({8: 480, 9: 672}, 256, 512, 4)
    assert target_widths(orig, cfg, 1) == Widths({8: 360, 9: 504}, 192, 384, 4)
    assert target_widths(orig, cfg, 2) == Widths({8: 240, 9: 336}, 128, 256, 3)
    assert target_widths(Widths({8: 100}, 30, 70, 2), cfg, 2) == Widths({8: 56}, 15, 40, 2), \
        "rounded up to a multiple of 8 from 64 on, so never more than the ratio goes; whole heads only"


def test_budget_uses_the_bootstrap_interval_not_the_bare_difference():
    from edgeqa.compress.prune import within_budget

    assert within_budget({"delta": -0.01, "ci_low": -0.025}, 0.03)
    assert not within_budget({"delta": -0.01, "ci_low": -0.05}, 0.03), "a small mean drop with a wide interval"
    assert within_budget({"delta": 0.0, "ci_low": 0.0}, 0.0)
    assert not within_budget({"delta": None, "ci_low": None}, 0.03), "no interval: nothing shows it is safe"


def test_prune_stage_on_the_tiny_students(tiny_pruned, tiny_students, tiny_params, tiny_manifest):
    """The real stage function: source best on val, each step measured, the kept step is the last within budget,
    and the saved model is the pruned one and loads with the library's own call."""
    from edgeqa.compress.prune import widths_of
    from edgeqa.student.model import Student, StudentModel

    res = tiny_pruned["res"]
    val = {k: tiny_students[f"{k}_metrics"]["val_auroc"] for k in ("baseline", "sft", "distill")}
    assert val[res["source"]] == max(val.values()), "source best: the highest val AUROC"
    hist = res["history"]
    assert [h["step"] for h in hist] == list(range(len(hist))) and hist[0]["within_budget"]
    passing = [h["step"] for h in hist if h["within_budget"]]
    assert res["kept_step"] == passing[-1] and all(h["within_budget"] for h in hist[:res["kept_step"] + 1])
    assert res["backed_off"] == (res["kept_step"] < tiny_params.prune.steps)
    for h in hist[1:]:
        assert h["macs"]["total"] < hist[0]["macs"]["total"] and h["parameters"] < hist[0]["parameters"]
        assert h["recovery"]["steps_run"] >= 1 and h["delta_auroc"]["resamples"] > 0
    assert all(h["latency_ms"]["p50"] > 0 for h in hist)
    m = StudentModel.from_pretrained(tiny_pruned["dir"])
    assert widths_of(m).as_dict() == hist[res["kept_step"]]["widths"]
    assert m.config.lineage == {"source": res["source"], "pruning_step": res["kept_step"],
                                "steps": tiny_params.prune.steps}
    import pandas as pd

    df = pd.read_parquet(tiny_manifest)
    out = Student(tiny_pruned["dir"]).predict_paths([str(p) for p in df[df.split == "test"].path[:2]], 4)
    assert [r["answer"]["verdict"] in ("good", "defective") for r in out] == [True, True]
    report = tiny_pruned["report"].read_text()
    assert f"Source: **{res['source']}**" in report and f"Kept: **step {res['kept_step']}**" in report
    assert (tiny_pruned["live"] / "metrics.json").is_file()


def test_self_distillation_targets_are_the_source_models_own_answer_distribution(tiny_students, tiny_params,
                                                                                  tiny_manifest, tiny_labels):
    """`prune.recovery.teacher: source`: every answer position gets the unpruned model's top-k log-probs; with
    the whole vocabulary kept, the KD term of the unpruned model against its own targets is zero, and a perturbed
    copy's is not."""
    import copy

    import pandas as pd
    from transformers import AutoTokenizer

    from edgeqa.compress.prune import source_targets
    from edgeqa.student.distill import kd_examples
    from edgeqa.student.features import load as load_features
    from edgeqa.student.kd import DistillLoss
    from edgeqa.student.model import TOKENIZER_DIR, StudentModel
    from edgeqa.student.train import batch_loss, read_labels
    from edgeqa.student.vocab import PrunedTokenizer
    from edgeqa.vlm.model import Layout, VisionLM

    src = tiny_students["baseline"]
    model = StudentModel.from_pretrained(src).eval()
    tok = PrunedTokenizer(AutoTokenizer.from_pretrained(src / TOKENIZER_DIR), model.config.vocab_map)
    layout = Layout.build(tok, model.config.schema())
    df = pd.read_parquet(tiny_manifest)
    lab = df[df.split == "labelled"].reset_index(drop=True)
    kx = kd_examples(layout, tok, lab, lab.iloc[:0], read_labels(tiny_labels), {"human": 1.0, "teacher": 0.0}, 3,
                     "w")
    feats, _ = load_features(tiny_params.student, tiny_students["features"], kx.shas)
    vlm = VisionLM(model.decoder, tok, model.projector, layout)
    source_targets(model, vlm, feats, kx.examples, top_k=3)
    for e in kx.examples:
        ids, _ = layout.answer_ids(e.answer, tok, e.reason_ids)
        assert [j for j, _, _ in e.kd] == list(range(len(ids))) and e.kd_flip_safe == 0
        assert all(len(t) == 3 and lp == sorted(lp, reverse=True) for _, t, lp in e.kd)
    source_targets(model, vlm, feats, kx.examples, top_k=model.decoder.get_input_embeddings().num_embeddings)
    kd_only = DistillLoss(alpha=1.0, temperature=1.0)
    batch = kx.examples[:8]
    with torch.no_grad():
        own = float(batch_loss(model, vlm, feats, batch, 1.0, kd_only))
        other = copy.deepcopy(model)
        for q in other.decoder.parameters():
            q.add_(torch.randn_like(q) * 0.05)
        moved = float(batch_loss(other, VisionLM(other.decoder, tok, other.projector, layout), feats, batch, 1.0,
                                 kd_only))
    assert own < 1e-4 < moved, "KL of the source against its own full distribution is zero; a changed model's is not"
