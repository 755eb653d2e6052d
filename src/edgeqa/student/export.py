"""ONNX export of a student, for the torch-free runtime (`edgeqa_runtime.session.OrtStudent`).

Two graphs, exported separately with the dynamo exporter (`torch.onnx.export(dynamo=True)`):
- `vision.onnx`: pixels (B, 3, S, S) -> prefix embeddings (B, grid*grid, hidden) (trunk, pooling, projector);
- `decoder.onnx`: inputs_embeds (B, T, hidden), attention_mask (B, P+T), position_ids (B, T) and the KV cache
  of the P earlier positions (past_key_i / past_value_i per layer) -> logits (B, T, V) and the updated cache
  (present_key_i / present_value_i). Dynamic B, T and P.
The token embedding table goes beside them as `embeddings.safetensors`, `tokenizer.json` is a tokenizer of the
pruned vocabulary only (built with the `tokenizers` library: student ids in, text out), and `runtime.json` holds
the layout (token ids of the prompt, fields and options), the schema, the temperatures and the operating
threshold. `manifest.json` (`edgeqa_runtime.bundle`) hashes every file, so the folder is an edge bundle.

`OrtStudent` (in the runtime) answers from these files like `edgeqa.student.model.Student`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeqa.io import atomic_dir
from edgeqa_runtime.bundle import write_manifest
from edgeqa_runtime.session import DECODER, EMBEDDINGS, RUNTIME, TOKENIZER, VISION

PRUNED_TOKEN = "<pruned>"  # the student's last id: any teacher token outside the vocabulary


def pruned_tokenizer(base_tok: Any, vocab_map: list[int]) -> Any:
    """A `tokenizers.Tokenizer` over the pruned vocabulary: student id i is teacher token `vocab_map[i]`, the
    last id is `<pruned>`. It decodes student ids to the text the teacher's tokenizer gives (same byte-level
    decoder; special tokens stay special) and encodes only words made of kept tokens."""
    from tokenizers import AddedToken, Tokenizer, models

    backend = base_tok.backend_tokenizer
    tokens = base_tok.convert_ids_to_tokens(list(vocab_map))
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab[PRUNED_TOKEN] = len(tokens)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PRUNED_TOKEN))
    tok.pre_tokenizer = backend.pre_tokenizer
    tok.decoder = backend.decoder
    special = {str(t) for t in base_tok.all_special_tokens}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if t in special]
                           + [AddedToken(PRUNED_TOKEN, special=True, normalized=False)])
    return tok


def _decoder_dims(cfg: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a llama or gpt2 decoder config."""
    if cfg.model_type == "gpt2":
        return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def export(student_dir: Path, out: Path, image_size: int | None = None, threshold: float = 0.5,
           **manifest: Any) -> dict[str, Any]:
    """Export a saved student folder to the bundle folder `out` (vision.onnx, decoder.onnx, embeddings,
    tokenizer.json, runtime.json, manifest.json). `threshold` is the operating point on P(defective);
    `manifest` adds facts to manifest.json (e.g. the source model)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, DynamicCache

    from edgeqa.student.model import TOKENIZER_DIR, StudentModel, count_parameters
    from edgeqa.student.vocab import PrunedTokenizer
    from edgeqa.vlm.model import Layout

    model = StudentModel.from_pretrained(student_dir).eval()
    cfg = model.config
    dec_cfg = model.decoder.config
    n_layers, kv_heads, head_dim = _decoder_dims(dec_cfg)
    s = image_size or cfg.image_size

    class Vision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.m.image_embeds(pixels)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model.decoder

        def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=dec_cfg)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            pkv = out.past_key_values
            flat: list[torch.Tensor] = []
            for i in range(n_layers):
                layer = pkv.layers[i]
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    hidden = int(model.projector.config.lm_hidden)
    b, t, p = 2, 3, 4
    past = [torch.randn(b, kv_heads, p, head_dim) * 0.1 for _ in range(2 * n_layers)]
    ex = (torch.randn(b, t, hidden) * 0.02, torch.ones(b, p + t, dtype=torch.long),
          torch.arange(p, p + t).repeat(b, 1), *past)
    past_names = [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    present_names = [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    B, T, P = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=4096), torch.export.Dim("past", max=4096)
    total = torch.export.Dim("total", max=8192)
    dyn = {"inputs_embeds": {0: B, 1: T}, "attention_mask": {0: B, 1: total}, "position_ids": {0: B, 1: T},
           "past": tuple({0: B, 2: P} for _ in past)}
    base_tok = AutoTokenizer.from_pretrained(student_dir / TOKENIZER_DIR)
    tok = PrunedTokenizer(base_tok, cfg.vocab_map)
    layout = Layout.build(tok, cfg.schema())
    with atomic_dir(out) as tmp, torch.no_grad():
        torch.onnx.export(Vision().eval(), (torch.randn(2, 3, s, s),), str(tmp / VISION), dynamo=True,
                          input_names=["pixels"], output_names=["image_embeds"],
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch", max=1024)}},
                          external_data=False, optimize=True)
        torch.onnx.export(Decoder().eval(), ex, str(tmp / DECODER), dynamo=True,
                          input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_shapes=dyn, external_data=False,
                          optimize=True)
        emb = model.decoder.get_input_embeddings().weight.detach().float().numpy()
        save_file({"embeddings": np.ascontiguousarray(emb)}, str(tmp / EMBEDDINGS))
        pruned_tokenizer(base_tok, cfg.vocab_map).save(str(tmp / TOKENIZER))
        runtime = {"image_size": s, "parameters": count_parameters(model), "layers": n_layers, "kv_heads": kv_heads,
                   "head_dim": head_dim, "threshold": threshold, "types": cfg.types, "locations": cfg.locations,
                   "verdict_temperature": cfg.verdict_temperature, "type_temperature": cfg.type_temperature,
                   "layout": {"pre": layout.pre, "post": layout.post, "field_ids": layout.field_ids,
                              "options": layout.options, "end": layout.end, "stops": layout.stops}}
        (tmp / RUNTIME).write_text(json.dumps(runtime) + "\n")
        write_manifest(tmp, graphs={"vision": "fp32", "decoder": "fp32"}, **manifest)
    return {"files": sorted(q.name for q in out.iterdir()),
            "bytes": {q.name: q.stat().st_size for q in out.iterdir() if q.is_file()}}
