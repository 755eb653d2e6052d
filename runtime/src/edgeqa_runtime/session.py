"""The student in onnxruntime, loaded from an edge bundle: numpy, onnxruntime and `tokenizers`, no torch.

A bundle (see `edgeqa_runtime.bundle`) holds `vision.onnx` (pixels -> prefix embeddings), `decoder.onnx`
(embeddings, mask, positions and the per-layer KV cache -> logits and the new cache), the token embeddings
`embeddings.safetensors`, the pruned-vocabulary tokenizer `tokenizer.json`, and `runtime.json` (layout token
ids, schema, temperatures, the operating threshold on P(defective)). Every file is checked against
`manifest.json` before anything is loaded.

`OrtStudent` answers like the PyTorch student (same contexts, first-token and sequence scoring, greedy reason
with the KV cache) and takes the same arguments as every other answerer: `top_k` soft targets at the verdict and
at each generated reason position, and `strict` (no stop before a few reason tokens). The image prefix runs once
per image: its KV cache is reused for the type and location fields and for the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgeqa_runtime.bundle import BundleError, verify
from edgeqa_runtime.files import folder_fingerprint
from edgeqa_runtime.preprocess import pixels
from edgeqa_runtime.schema import Answer, AnswerSchema

VISION, DECODER, EMBEDDINGS, RUNTIME, TOKENIZER = ("vision.onnx", "decoder.onnx", "embeddings.safetensors",
                                                   "runtime.json", "tokenizer.json")
STRICT_MIN_REASON_TOKENS = 3  # the stricter retry forbids stopping before this many reason tokens

ExportError = BundleError  # the name earlier code used


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _topk(position: str, logprobs: np.ndarray, k: int) -> dict[str, Any]:
    idx = np.argsort(-logprobs, kind="stable")[:k]
    return {"position": position, "ids": [int(i) for i in idx], "logprobs": [round(float(logprobs[i]), 5) for i in idx]}


def session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session for one graph, with a message that names the file when it cannot load."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types (opset, IR version, bad graph)
        raise BundleError(f"{path}: onnxruntime {ort.__version__} cannot load this graph ({exc}); the opset or "
                          "IR version may be newer than this runtime supports: install the edgeqa-runtime "
                          "that matches the bundle") from None


class OrtStudent:
    """The student of an edge bundle in onnxruntime. Answers one image at a time (batch 1 is the edge case)."""

    def __init__(self, folder: Path, threads: int = 2, verify_files: bool = True):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.manifest = verify(folder) if verify_files else {}
        self.folder = folder
        self.vision = session(folder / VISION, threads)
        self.decoder = session(folder / DECODER, threads)
        self._out_names = [o.name for o in self.decoder.get_outputs()]
        self.emb = load_file(str(folder / EMBEDDINGS))["embeddings"]
        try:
            self.rt = json.loads((folder / RUNTIME).read_text())
            self.L = self.rt["layout"]
            self._schema = AnswerSchema(types=tuple(self.rt["types"]), locations=tuple(self.rt["locations"]))
            self.threshold = float(self.rt.get("threshold", 0.5))
        except (KeyError, json.JSONDecodeError) as exc:
            raise BundleError(f"{folder / RUNTIME}: missing or unreadable key ({exc})") from None
        self.tok = Tokenizer.from_file(str(folder / TOKENIZER))
        self.fingerprint = folder_fingerprint(folder)

    # ------------------------------------------------------------------------------------ the answerer API
    def schema(self) -> AnswerSchema:
        return self._schema

    def parameters(self) -> int | None:
        """The student's parameter count, recorded by the export."""
        n = self.rt.get("parameters")
        return None if n is None else int(n)

    def usage(self) -> None:
        return None

    # ---------------------------------------------------------------------------------------- decoder
    def _empty_past(self) -> dict[str, np.ndarray]:
        z = np.zeros((1, self.rt["kv_heads"], 0, self.rt["head_dim"]), np.float32)
        return {f"past_{k}_{i}": z for i in range(self.rt["layers"]) for k in ("key", "value")}

    @staticmethod
    def feeds(embeds: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The decoder's inputs for `embeds` (B, T, hidden) after a cache of P positions (no padding)."""
        b, t = embeds.shape[0], embeds.shape[1]
        p = next(iter(past.values())).shape[2]
        return {"inputs_embeds": embeds.astype(np.float32, copy=False), "attention_mask": np.ones((b, p + t), np.int64),
                "position_ids": np.broadcast_to(np.arange(p, p + t, dtype=np.int64), (b, t)), **past}

    def _run(self, embeds: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        outs = self.decoder.run(None, self.feeds(embeds, past))
        present = {n.replace("present_", "past_"): v for n, v in zip(self._out_names[1:], outs[1:])}
        return outs[0], present

    def _ids(self, ids: list[int]) -> np.ndarray:
        return self.emb[np.asarray(ids, np.int64)][None]

    def _option_logprobs(self, ctx_logits: np.ndarray, past: dict[str, np.ndarray], options: list[list[int]]
                         ) -> np.ndarray:
        """Options scored after a context: first token when the first tokens are distinct, else whole sequences
        (the continuations run on the context's cache, one batched call per option length). Normalised over the
        options."""
        first = _log_softmax(ctx_logits)
        if len({o[0] for o in options}) == len(options):
            return _log_softmax(np.array([first[o[0]] for o in options]))
        totals = np.array([float(first[o[0]]) for o in options])
        by_len: dict[int, list[int]] = {}
        for i, o in enumerate(options):
            if len(o) > 1:
                by_len.setdefault(len(o), []).append(i)
        for n, idx in by_len.items():  # one decoder call per option length: the options are the batch
            tiled = {k: np.repeat(v, len(idx), axis=0) for k, v in past.items()}
            embeds = np.stack([self.emb[np.asarray(options[i][:-1], np.int64)] for i in idx])
            lg, _ = self._run(embeds, tiled)
            lp = _log_softmax(lg)
            for row, i in enumerate(idx):
                totals[i] += float(sum(lp[row, k, options[i][k + 1]] for k in range(n - 1)))
        return _log_softmax(totals)

    def _continue(self, past: dict[str, np.ndarray], ids: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run token ids after a cached context; the context's cache is left as it was (reused by the caller)."""
        return self._run(self._ids(ids), past)

    # ---------------------------------------------------------------------------------------- answers
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """The mean image token of each image (N, 3, S, S) -> (N, hidden): what the prediction log records and
        drift compares."""
        return self.vision.run(None, {"pixels": pixels.astype(np.float32)})[0].mean(1)

    def answer(self, pixels: np.ndarray, max_reason_tokens: int, top_k: int = 1, strict: bool = False
               ) -> dict[str, Any]:
        """One image (1, 3, S, S), as `edgeqa_runtime.preprocess.pixels` makes it -> the answer and its scores."""
        L, schema = self.L, self._schema
        img = self.vision.run(None, {"pixels": pixels.astype(np.float32)})[0]
        prefix = np.concatenate([self._ids(L["pre"]), img, self._ids(L["post"])], 1)
        tail_v = L["field_ids"]["verdict"]
        # The image prefix and the verdict field run once; every later field continues from this cache.
        logits, past = self._run(np.concatenate([prefix, self._ids(tail_v)], 1), self._empty_past())
        soft = [_topk("verdict", _log_softmax(logits[0, -1]), top_k)]
        v = self._option_logprobs(logits[0, -1], past, L["options"]["verdict"])
        d = float(v[1] - v[0])
        p_def = float(1 / (1 + np.exp(-d / self.rt["verdict_temperature"])))
        verdict = "defective" if p_def >= self.threshold else "good"
        opts = schema.options()

        def opt(f: str, value: str | None) -> list[int]:
            return L["options"][f][opts[f].index(value or "none")]

        types = list(schema.types)
        type_pick, type_probs = None, {}
        tail_t = opt("verdict", "defective") + L["field_ids"]["type"]
        if types:
            lg, pst = self._continue(past, tail_t)
            tl = self._option_logprobs(lg[0, -1], pst, L["options"]["type"][:len(types)])
            tp = np.exp(_log_softmax(tl / self.rt["type_temperature"]))
            type_probs = {t: float(x) for t, x in zip(types, tp)}
            type_pick = types[int(tp.argmax())]
        loc, loc_probs = None, {}
        if schema.locations:
            lg, pst = self._continue(past, tail_t + opt("type", type_pick) + L["field_ids"]["location"])
            ll = self._option_logprobs(lg[0, -1], pst, L["options"]["location"])
            loc_probs = {o: float(x) for o, x in zip(opts["location"], np.exp(ll))}
            loc = schema.locations[int(ll[:len(schema.locations)].argmax())]
        t_ans, l_ans = (None, None) if verdict == "good" else (type_pick, loc)
        tail_r = (opt("verdict", verdict) + L["field_ids"]["type"] + opt("type", t_ans)
                  + L["field_ids"]["location"] + opt("location", l_ans) + L["field_ids"]["reason"])
        logits, past = self._continue(past, tail_r)
        gen: list[int] = []
        stops = list(L["stops"])
        min_tokens = min(STRICT_MIN_REASON_TOKENS, max_reason_tokens) if strict else 0
        for step in range(max_reason_tokens):
            scores = logits[0, -1].astype(np.float64)
            if step < min_tokens:  # as transformers' min_new_tokens: the stop tokens cannot win yet
                scores = scores.copy()
                scores[stops] = -np.inf
            nxt = int(scores.argmax())
            if nxt in stops:
                break
            soft.append(_topk(f"reason:{step}", _log_softmax(scores), top_k))
            gen.append(nxt)
            logits, past = self._continue(past, [nxt])
        reason = self.tok.decode(gen, skip_special_tokens=True).strip()
        a = Answer(verdict, t_ans, l_ans, reason)
        return {"answer": asdict(a), "p_defective": p_def, "p_defective_lm": None, "type_probs": type_probs,
                "location_probs": loc_probs, "soft_targets": soft, "generated_tokens": len(gen),
                "anomaly_score": None}

    def predict_file(self, path: str | Path, max_reason_tokens: int, top_k: int = 1, strict: bool = False
                     ) -> dict[str, Any]:
        """One image file's record; `latency_ms` runs from the file read to the answer (decoding included).
        A file that cannot be read or decoded raises `ImageReadError` naming it; model errors propagate."""
        from PIL import UnidentifiedImageError

        t0 = time.perf_counter()
        try:
            x = pixels([path], int(self.rt["image_size"]))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageReadError(f"{path}: cannot read the image: {type(exc).__name__}: {exc}") from exc
        rec = self.answer(x, max_reason_tokens, top_k, strict)
        rec["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return rec

    def predict_paths(self, paths: Sequence[str], max_reason_tokens: int, top_k: int = 1, strict: bool = False
                      ) -> list[dict[str, Any]]:
        """One record per image file (see `predict_file`)."""
        return [self.predict_file(p, max_reason_tokens, top_k, strict) for p in paths]
