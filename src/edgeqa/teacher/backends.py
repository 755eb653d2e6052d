"""Teacher backends other than the local one, behind the same interface (`predict_paths`, `meta.schema()`,
the `edgeqa.answerer.Answerer` protocol):

- `hf`: any local Hugging Face VLM folder. BLIP-2 through `Blip2ForConditionalGeneration`, others through
  `AutoModelForImageTextToText`, each with its `AutoProcessor`. Zero-shot with the seed's prompt; the free
  answer is mapped into the schema (`map_free_answer`).
- `openai`: any OpenAI-compatible chat-completions endpoint (GPT-4o, vLLM, Ollama, llama.cpp server), through
  the `openai` SDK: images as base64 data URLs, JSON-schema structured output where the server accepts it
  (the strict parser otherwise), timeouts, retries with exponential backoff and jitter on 429/5xx (the SDK's
  own), a concurrency limit, token and cost accounting. The key is read from the environment variable named in
  params, and never written anywhere.

Neither gives calibrated probabilities: P(defective) is the stated verdict (1 or 0), and there are no type or
location distributions and no soft targets. The teacher folder of these backends (written by `teacher_sft`)
is a descriptor: `teacher.json` with the backend's settings, so the DAG, the label cache and the fingerprint
work the same way.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeqa.errors import StageError
from edgeqa_runtime.schema import NONE, PROMPT, STRICT_PROMPT, VERDICTS, Answer, AnswerParseError, AnswerSchema

log = logging.getLogger("edgeqa.backends")

_DEFECT_WORDS = re.compile(r"\b(defective|defect|damaged|broken|faulty|flaw|flawed|crack|cracked|scratch|scratched|"
                           r"hole|stain|anomal\w*|not good|reject\w*|fail\w*)\b")
_GOOD_WORDS = re.compile(r"\b(good|no defects?|intact|acceptable|flawless|pass\w*|ok|okay|fine|normal)\b")


@dataclass
class RemoteMeta:
    """teacher.json of a descriptor folder (backend hf or openai)."""

    backend: str
    types: list[str]
    locations: list[str]
    settings: dict[str, Any]
    max_new_tokens: int = 64

    def schema(self) -> AnswerSchema:
        return AnswerSchema(types=tuple(self.types), locations=tuple(self.locations))


def instructions(schema: AnswerSchema, strict: bool) -> str:
    opts = schema.options()
    text = (f"{PROMPT} Say whether the product is good or defective, the defect type (one of: "
            f"{', '.join(opts['type'])}), where it is (one of: {', '.join(opts['location'])}) and why, as: "
            "verdict: ...; type: ...; location: ...; reason: ...")
    return text + (" " + STRICT_PROMPT if strict else "")


def map_free_answer(text: str, schema: AnswerSchema) -> tuple[Answer | None, str | None]:
    """A zero-shot model's free answer mapped into the schema: the strict form if it is there, otherwise the
    verdict from defect/good words, the first type and grid word named, and the text as the reason.
    Returns (answer, None), or (None, why) when no verdict can be read: that counts as a parse failure."""
    line = " ".join(text.split())
    try:
        return schema.parse(line), None
    except AnswerParseError:
        pass
    low = line.lower()
    types = [t for t in schema.types if re.search(r"\b" + re.escape(t.replace("_", " ").lower()) + r"\b", low)]
    locs = sorted((m.start(), w) for w in schema.locations for m in re.finditer(r"\b" + re.escape(w) + r"\b", low))
    # "upper left" also contains "left": keep the longest words that start earliest.
    loc = max((w for s, w in locs if s == locs[0][0]), key=len) if locs else None
    defect, good = _DEFECT_WORDS.search(low), _GOOD_WORDS.search(low)
    negated = re.search(r"\bno (visible )?(defects?|damage|flaws?)\b|\bnot (defective|damaged|faulty)\b", low)
    if negated:
        verdict = "good"
    elif defect is not None or types:
        verdict = "defective"
    elif good is not None:
        verdict = "good"
    else:
        return None, "no verdict could be read from the free answer"
    if verdict == "good":
        return Answer("good", None, None, line), None
    t = types[0] if types else None
    if schema.types and t is None:
        return None, f"a defective answer names none of the types {list(schema.types)}"
    try:
        return schema.check(Answer("defective", t, loc, line), text), None
    except AnswerParseError as exc:
        return None, exc.why


def _remote_record(ans: Answer | None, why: str | None, raw: str, tokens: int) -> dict[str, Any]:
    """An unreadable answer has no verdict (None) and P(defective) 0.5; evaluation counts it as a reject."""
    if ans is None:
        answer: dict[str, Any] = {"verdict": None, "defect_type": None, "location": None, "reason": raw.strip()}
        p = 0.5
    else:
        answer = {"verdict": ans.verdict, "defect_type": ans.defect_type, "location": ans.location,
                  "reason": ans.reason}
        p = 1.0 if ans.verdict == "defective" else 0.0
    return {"answer": answer, "raw_error": why, "raw_text": raw if why else None,
            "p_defective": p, "p_defective_lm": None, "type_probs": None,
            "location_probs": None, "soft_targets": [], "generated_tokens": tokens, "anomaly_score": None}


def _folder_fingerprint(meta: RemoteMeta, extra: bytes = b"") -> str:
    h = hashlib.sha256(json.dumps(meta.__dict__, sort_keys=True).encode())
    h.update(extra)
    return h.hexdigest()[:16]


class HFTeacher:
    """A local Hugging Face VLM folder, zero-shot."""

    def __init__(self, meta: RemoteMeta, threads: int = 2):
        import torch
        from transformers import AutoConfig, AutoProcessor

        self.meta = meta
        path = Path(meta.settings["path"])
        if not (path / "config.json").is_file():
            raise StageError(f"teacher.hf.path {str(path)!r} is not a Hugging Face model folder (no config.json "
                             "in it); point it at a folder written by save_pretrained (BLIP-2, Qwen-VL, ...)")
        torch.set_num_threads(threads)
        try:
            cfg = AutoConfig.from_pretrained(path)
            self.processor = AutoProcessor.from_pretrained(path)
            if cfg.model_type == "blip-2":
                from transformers import Blip2ForConditionalGeneration
                self.model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
                self.chat = False
            else:
                from transformers import AutoModelForImageTextToText
                self.model = AutoModelForImageTextToText.from_pretrained(path).eval()
                self.chat = getattr(self.processor, "chat_template", None) is not None
        except (OSError, ValueError, KeyError) as exc:
            raise StageError(f"teacher.hf.path {str(path)!r}: could not load a vision-language model and its "
                             f"processor from it: {exc}") from None
        self.model_type = cfg.model_type
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for f in sorted(path.rglob("*.safetensors")):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
        self.fingerprint = _folder_fingerprint(meta, digest.digest())
        self.requests = 0

    def _prompt(self, strict: bool) -> str:
        q = instructions(self.meta.schema(), strict)
        if self.chat:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            return str(self.processor.apply_chat_template(msgs, add_generation_prompt=True))
        return f"Question: {q} Answer:"

    def schema(self) -> AnswerSchema:
        return self.meta.schema()

    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def predict_paths(self, paths: Sequence[str], max_reason_tokens: int, top_k: int = 1, strict: bool = False
                      ) -> list[dict[str, Any]]:
        """Free answers mapped into the schema. Generation length is the backend's own
        (`teacher.hf.max_new_tokens`: the reason comes inside a free answer); no soft targets exist."""
        import torch
        from PIL import Image

        images = []
        for p in paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        enc = self.processor(images=images, text=[self._prompt(strict)] * len(paths), return_tensors="pt",
                             padding=True)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.meta.max_new_tokens, do_sample=False)
        n_in = enc["input_ids"].shape[1]
        tok = getattr(self.processor, "tokenizer", self.processor)
        recs = []
        for row in out:
            gen = row[n_in:] if row.shape[0] > n_in else row  # decoder-only models echo the prompt
            text = tok.decode(gen, skip_special_tokens=True)
            ans, why = map_free_answer(text, self.meta.schema())
            recs.append(_remote_record(ans, why, text, int((gen != tok.pad_token_id).sum())
                                       if tok.pad_token_id is not None else len(gen)))
        self.requests += len(paths)
        return recs

    def usage(self) -> dict[str, Any]:
        return {"backend": "hf", "model_type": self.model_type, "images": self.requests}


@dataclass
class _Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    structured_fallbacks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OpenAITeacher:
    """An OpenAI-compatible chat-completions endpoint."""

    def __init__(self, meta: RemoteMeta):
        import openai

        self.meta = meta
        s = meta.settings
        self.base_url, self.model, self.key_env = s["base_url"], s["model"], s["api_key_env"]
        key = os.environ.get(self.key_env)
        if not key:
            raise StageError(f"teacher.openai: the environment variable {self.key_env} (teacher.openai.api_key_env) "
                             f"is not set; it must hold the API key for {self.base_url}")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=float(s["timeout_s"]),
                                    max_retries=int(s["max_retries"]))
        self.structured = bool(s["structured_output"])
        self.concurrency = int(s["concurrency"])
        self.fingerprint = _folder_fingerprint(meta)
        self.u = _Usage()

    def _schema_format(self) -> dict[str, Any]:
        opts = self.meta.schema().options()
        props = {"verdict": {"type": "string", "enum": list(VERDICTS)},
                 "type": {"type": "string", "enum": list(opts["type"])},
                 "location": {"type": "string", "enum": list(opts["location"])},
                 "reason": {"type": "string"}}
        return {"type": "json_schema", "json_schema": {"name": "inspection_answer", "strict": True, "schema": {
            "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}

    def _ask(self, path: str, strict: bool) -> dict[str, Any]:
        import openai
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(path) as im:
            im.convert("RGB").save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        messages = [{"role": "system", "content": PROMPT},
                    {"role": "user", "content": [{"type": "text", "text": instructions(self.meta.schema(), strict)},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        kw: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0,
                              "max_tokens": self.meta.max_new_tokens}
        structured = self.structured  # read once: another thread may switch it off meanwhile
        try:
            try:
                r = self.client.chat.completions.create(  # type: ignore[call-overload]
                    **kw, **({"response_format": self._schema_format()} if structured else {}))
            except openai.BadRequestError:
                if not structured:
                    raise
                # The server does not take JSON-schema output: ask in plain text and parse, from now on.
                with self.u.lock:
                    if self.structured:
                        log.warning("%s refused structured output; using the text form and the parser from now on",
                                    self.base_url)
                    self.structured = False
                    self.u.structured_fallbacks += 1
                r = self.client.chat.completions.create(**kw)  # type: ignore[call-overload]
        except openai.AuthenticationError:
            raise StageError(f"endpoint {self.base_url} refused the API key in ${self.key_env} (401); "
                             "check the key for this endpoint") from None
        except openai.APIConnectionError as exc:
            raise StageError(f"endpoint {self.base_url} could not be reached after "
                             f"{self.meta.settings['max_retries']} retries: {type(exc).__name__}") from None
        except openai.APIStatusError as exc:
            raise StageError(f"endpoint {self.base_url} answered HTTP {exc.status_code} after "
                             f"{self.meta.settings['max_retries']} retries") from None
        text = r.choices[0].message.content or ""
        usage = r.usage
        with self.u.lock:
            self.u.requests += 1
            if usage is not None:
                self.u.prompt_tokens += usage.prompt_tokens
                self.u.completion_tokens += usage.completion_tokens
        ans, why = self._read(text)
        return _remote_record(ans, why, text, usage.completion_tokens if usage is not None else 0)

    def _read(self, text: str) -> tuple[Answer | None, str | None]:
        schema = self.meta.schema()
        s = text.strip()
        if s.startswith("{"):
            try:
                d = json.loads(s)
                a = Answer(str(d["verdict"]), None if d["type"] in (None, NONE) else str(d["type"]),
                           None if d["location"] in (None, NONE) else str(d["location"]), str(d["reason"]).strip())
                return schema.check(a, text), None
            except (ValueError, KeyError, TypeError) as exc:
                why = exc.why if isinstance(exc, AnswerParseError) else f"structured answer unreadable: {exc}"
                return None, why
        try:
            return schema.parse(s), None
        except AnswerParseError as exc:
            return None, exc.why

    def schema(self) -> AnswerSchema:
        return self.meta.schema()

    def parameters(self) -> None:
        return None  # the weights are behind the endpoint

    def predict_paths(self, paths: Sequence[str], max_reason_tokens: int, top_k: int = 1, strict: bool = False
                      ) -> list[dict[str, Any]]:
        """Answers from the endpoint (`teacher.openai.max_new_tokens` per answer); no soft targets exist."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            return list(ex.map(lambda p: self._ask(p, strict), paths))

    def usage(self) -> dict[str, Any]:
        s = self.meta.settings
        cost = (self.u.prompt_tokens * s["price_in_per_mtok"]
                + self.u.completion_tokens * s["price_out_per_mtok"]) / 1e6
        return {"backend": "openai", "endpoint": self.base_url, "model": self.model, "requests": self.u.requests,
                "prompt_tokens": self.u.prompt_tokens, "completion_tokens": self.u.completion_tokens,
                "cost_usd": round(cost, 6), "structured_output": self.structured,
                "structured_fallbacks": self.u.structured_fallbacks}
