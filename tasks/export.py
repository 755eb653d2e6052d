"""ONNX export of a student and a torch-free runtime for it (onnxruntime + numpy + the tokenizer).

Two graphs, exported separately with the dynamo exporter (`torch.onnx.export(dynamo=True)`):
- `vision.onnx`: pixels (B, 3, S, S) -> prefix embeddings (B, grid*grid, hidden) (trunk, pooling, projector);
- `decoder.onnx`: inputs_embeds (B, T, hidden), attention_mask (B, P+T), position_ids (B, T) and the KV cache
  of the P earlier positions (past_key_i / past_value_i per layer) -> logits (B, T, V) and the updated cache
  (present_key_i / present_value_i). Dynamic B, T and P.
The token embedding table goes beside them as `embeddings.safetensors`, and `runtime.json` holds the layout
(token ids of the prompt, fields and options), the schema, the temperatures and the vocabulary map.

`OrtStudent` answers like `tasks.student.Student` (same contexts, first-token and sequence scoring, greedy reason
with the KV cache), one image at a time. The quantization and edge stages build on these files.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tasks.answer import Answer, AnswerSchema
from tasks.common import StageError, atomic_dir

VISION, DECODER, EMBEDDINGS, RUNTIME = "vision.onnx", "decoder.onnx", "embeddings.safetensors", "runtime.json"


def _decoder_dims(cfg: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a llama or gpt2 decoder config."""
    if cfg.model_type == "gpt2":
        return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def export(student_dir: Path, out: Path, image_size: int | None = None) -> dict[str, Any]:
    """Export a saved student folder to `out` (vision.onnx, decoder.onnx, embeddings, runtime.json)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer, DynamicCache

    from tasks.student import TOKENIZER_DIR, PrunedTokenizer, StudentModel
    from tasks.vlm import Layout

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
        torch.onnx.export(Vision(), (torch.randn(2, 3, s, s),), str(tmp / VISION), dynamo=True,
                          input_names=["pixels"], output_names=["image_embeds"],
                          dynamic_shapes={"pixels": {0: torch.export.Dim("batch", max=1024)}},
                          external_data=False, optimize=True)
        torch.onnx.export(Decoder(), ex, str(tmp / DECODER), dynamo=True,
                          input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_shapes=dyn, external_data=False,
                          optimize=True)
        emb = model.decoder.get_input_embeddings().weight.detach().float().numpy()
        save_file({"embeddings": np.ascontiguousarray(emb)}, str(tmp / EMBEDDINGS))
        base_tok.save_pretrained(tmp / "tokenizer")
        runtime = {"image_size": s, "layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim,
                   "vocab_map": cfg.vocab_map, "types": cfg.types, "locations": cfg.locations,
                   "verdict_temperature": cfg.verdict_temperature, "type_temperature": cfg.type_temperature,
                   "layout": {"pre": layout.pre, "post": layout.post, "field_ids": layout.field_ids,
                              "options": layout.options, "end": layout.end, "stops": layout.stops}}
        (tmp / RUNTIME).write_text(json.dumps(runtime) + "\n")
    return {"files": sorted(q.name for q in out.iterdir()),
            "bytes": {q.name: q.stat().st_size for q in out.iterdir() if q.is_file()}}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class OrtStudent:
    """The exported student in onnxruntime: no torch. Answers one image at a time."""

    def __init__(self, folder: Path, threads: int = 2):
        import onnxruntime as ort
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        for name in (VISION, DECODER, EMBEDDINGS, RUNTIME):
            if not (folder / name).is_file():
                raise StageError(f"{folder / name} is missing: export the student first (tasks.export)")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.vision = ort.InferenceSession(str(folder / VISION), so, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(folder / DECODER), so, providers=["CPUExecutionProvider"])
        self.emb = load_file(str(folder / EMBEDDINGS))["embeddings"]
        self.rt = json.loads((folder / RUNTIME).read_text())
        self.L = self.rt["layout"]
        self.schema = AnswerSchema(types=tuple(self.rt["types"]), locations=tuple(self.rt["locations"]))
        self.base_tok = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))  # no transformers, no torch
        self.keep = self.rt["vocab_map"]

    # ---------------------------------------------------------------------------------------- decoder
    def _empty_past(self) -> dict[str, np.ndarray]:
        z = np.zeros((1, self.rt["kv_heads"], 0, self.rt["head_dim"]), np.float32)
        return {f"past_{k}_{i}": z for i in range(self.rt["layers"]) for k in ("key", "value")}

    def _run(self, embeds: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        p = next(iter(past.values())).shape[2]
        t = embeds.shape[1]
        feeds = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": np.ones((1, p + t), np.int64),
                 "position_ids": np.arange(p, p + t, dtype=np.int64)[None], **past}
        outs = self.decoder.run(None, feeds)
        names = [o.name for o in self.decoder.get_outputs()]
        present = {n.replace("present_", "past_"): v for n, v in zip(names[1:], outs[1:])}
        return outs[0], present

    def _ids(self, ids: list[int]) -> np.ndarray:
        return self.emb[np.asarray(ids, np.int64)][None]

    def _option_logprobs(self, ctx_logits: np.ndarray, past: dict[str, np.ndarray], options: list[list[int]]
                         ) -> np.ndarray:
        """Options scored after a context: first token when the first tokens are distinct, else whole sequences
        (each continuation run on the context's cache). Normalised over the options."""
        first = _log_softmax(ctx_logits)
        if len({o[0] for o in options}) == len(options):
            s = np.array([first[o[0]] for o in options])
        else:
            s = []
            for o in options:
                total = first[o[0]]
                if len(o) > 1:
                    lg, _ = self._run(self._ids(o[:-1]), past)
                    lp = _log_softmax(lg[0])
                    total += sum(lp[k, o[k + 1]] for k in range(len(o) - 1))
                s.append(total)
            s = np.array(s)
        return _log_softmax(s)

    # ---------------------------------------------------------------------------------------- answers
    def answer(self, pixels: np.ndarray, max_reason_tokens: int) -> dict[str, Any]:
        """One image (1, 3, S, S), normalised as `tasks.vision.to_tensor` does -> the answer and its scores."""
        L, schema = self.L, self.schema
        img = self.vision.run(None, {"pixels": pixels.astype(np.float32)})[0]
        prefix = np.concatenate([self._ids(L["pre"]), img, self._ids(L["post"])], 1)
        tail_v = L["field_ids"]["verdict"]
        logits, past = self._run(np.concatenate([prefix, self._ids(tail_v)], 1), self._empty_past())
        v = self._option_logprobs(logits[0, -1], past, L["options"]["verdict"])
        d = float(v[1] - v[0])
        p_def = float(1 / (1 + np.exp(-d / self.rt["verdict_temperature"])))
        verdict = "defective" if p_def >= 0.5 else "good"
        opts = schema.options()

        def opt(f: str, value: str | None) -> list[int]:
            return L["options"][f][opts[f].index(value or "none")]

        types = list(schema.types)
        type_pick, type_probs = None, {}
        tail_t = tail_v + opt("verdict", "defective") + L["field_ids"]["type"]
        if types:
            lg, pst = self._run(self._ids(tail_t[len(tail_v):]), past)
            tl = self._option_logprobs(lg[0, -1], pst, L["options"]["type"][:len(types)])
            z = tl / self.rt["type_temperature"]
            tp = np.exp(_log_softmax(z))
            type_probs = {t: float(x) for t, x in zip(types, tp)}
            type_pick = types[int(tp.argmax())]
        loc, loc_probs = None, {}
        if schema.locations:
            tail_l = tail_t + opt("type", type_pick) + L["field_ids"]["location"]
            lg, pst = self._run(np.concatenate([prefix, self._ids(tail_l)], 1), self._empty_past())
            ll = self._option_logprobs(lg[0, -1], pst, L["options"]["location"])
            loc_probs = {o: float(x) for o, x in zip(opts["location"], np.exp(ll))}
            loc = schema.locations[int(ll[:len(schema.locations)].argmax())]
        t_ans, l_ans = (None, None) if verdict == "good" else (type_pick, loc)
        tail_r = (tail_v + opt("verdict", verdict) + L["field_ids"]["type"] + opt("type", t_ans)
                  + L["field_ids"]["location"] + opt("location", l_ans) + L["field_ids"]["reason"])
        logits, past = self._run(np.concatenate([prefix, self._ids(tail_r)], 1), self._empty_past())
        gen: list[int] = []
        stops = set(L["stops"])
        for _ in range(max_reason_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in stops:
                break
            gen.append(nxt)
            logits, past = self._run(self._ids([nxt]), past)
        pruned = len(self.keep)
        reason = self.base_tok.decode([self.keep[i] for i in gen if i != pruned], skip_special_tokens=True).strip()
        a = Answer(verdict, t_ans, l_ans, reason)
        return {"answer": asdict(a), "p_defective": p_def, "type_probs": type_probs, "location_probs": loc_probs,
                "generated_tokens": len(gen)}

    def predict_paths(self, paths: list[str], max_reason_tokens: int) -> list[dict[str, Any]]:
        return [self.answer(pixels([p], self.rt["image_size"]), max_reason_tokens) for p in paths]


def pixels(paths: list[str], size: int) -> np.ndarray:
    """Images as the student's input (N, 3, size, size) float32, ImageNet-normalised: numpy only, the same
    arithmetic as `tasks.vision.to_tensor`."""
    from PIL import Image

    from tasks.vision import IMAGENET_MEAN, IMAGENET_STD

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32))
    x = (np.stack(arrs) / 255.0).transpose(0, 3, 1, 2)
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return ((x - mean) / std).astype(np.float32)
