"""Teacher backends `openai` and `hf` through the real label and evaluate stages.

`openai`: a real HTTP server on loopback that speaks the chat-completions API. It is an oracle: it decodes
the image from the data URL, looks its pixels up in the manifest and answers the reference answer, so a
perfect score proves that images, prompts and answers cross the wire intact. It also injects 429s, a 500, an
unparseable first answer, and (on request) refuses JSON-schema output, to exercise retries and fallbacks.

`hf`: a tiny BLIP-2 with RANDOM weights, built from a config and saved to a temp folder. It proves the code
path (load, prompt, generate, map into the schema, count failures, retry) and nothing about accuracy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from edgeqa.data.manifest import reference_answer
from edgeqa.errors import StageError
from edgeqa_runtime.schema import STRICT_PROMPT

from ..conftest import run_evaluate, run_label, run_teacher_sft

pytestmark = pytest.mark.slow

KEY = "sk-test-0123456789abcdef-never-logged"


def _pixels_hash(img: Image.Image) -> str:
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


class Oracle:
    def __init__(self, manifest):
        df = pd.read_parquet(manifest)
        self.answers = {_pixels_hash(Image.open(r.path)): reference_answer(r) for _, r in df.iterrows()}
        self.garble = None  # pixel hash whose first (non-strict) answer is garbage
        self.refuse_schema = False
        self.fail_first = 0  # answer this many requests with 429, then one with 500
        self.seen = {"requests": 0, "429": 0, "500": 0, "strict": 0, "schema": 0, "auth": set()}
        self.lock = threading.Lock()

    def handle(self, h: BaseHTTPRequestHandler) -> tuple[int, dict]:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.seen["requests"] += 1
            self.seen["auth"].add(h.headers.get("Authorization"))
            if h.headers.get("Authorization") != f"Bearer {KEY}":
                return 401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}}
            if self.fail_first > 0:
                self.fail_first -= 1
                code = 429 if self.fail_first > 0 else 500
                self.seen[str(code)] += 1
                return code, {"error": {"message": "busy", "type": "server_error"}}
        if "response_format" in body:
            if self.refuse_schema:
                return 400, {"error": {"message": "response_format json_schema is not supported"}}
            with self.lock:
                self.seen["schema"] += 1
        content = body["messages"][1]["content"]
        text = next(c["text"] for c in content if c["type"] == "text")
        url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        key = _pixels_hash(img)
        a = self.answers[key]
        strict = STRICT_PROMPT in text
        with self.lock:
            self.seen["strict"] += strict
        if key == self.garble and not strict:
            out = "Honestly I cannot tell."
        elif "response_format" in body:
            out = json.dumps({"verdict": a.verdict, "type": a.defect_type or "none", "location": a.location or "none",
                              "reason": a.reason})
        else:
            out = (f"verdict: {a.verdict}; type: {a.defect_type or 'none'}; location: {a.location or 'none'}; "
                   f"reason: {a.reason}")
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": out}}],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}


@pytest.fixture
def oracle(tiny_manifest):
    o = Oracle(tiny_manifest)

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            code, payload = o.handle(self)
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    o.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield o
    srv.shutdown()


def _openai_params(tiny_params, url, **kw):
    oa = tiny_params.teacher.openai.model_copy(update={"base_url": url, "api_key_env": "EDGEQA_TEST_KEY",
                                                       "max_retries": 4, "timeout_s": 10, **kw})
    return tiny_params.model_copy(update={"teacher": tiny_params.teacher.model_copy(
        update={"backend": "openai", "openai": oa})})


def test_openai_backend_labels_and_evaluates_through_a_loopback_server(oracle, tiny_params, tiny_manifest,
                                                                       tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("EDGEQA_TEST_KEY", KEY)
    p = _openai_params(tiny_params, oracle.url)
    df = pd.read_parquet(tiny_manifest)
    pool = df[df.split.isin(p.label.pools)]
    oracle.garble = _pixels_hash(Image.open(pool.path.iloc[3]))
    oracle.fail_first = 3  # two 429s, then a 500: each retried with backoff by the SDK
    tdir = tmp_path / "teacher"
    run_teacher_sft(p, tmp_path / "unused", tiny_manifest, tdir, tmp_path / "sft.json", tmp_path / "sft.md")
    res = run_label(p, tdir, tiny_manifest, tmp_path / "labels", tmp_path / "m.json", tmp_path / "r.md")
    assert oracle.seen["429"] == 2 and oracle.seen["500"] == 1, oracle.seen
    recs = [json.loads(x) for x in (tmp_path / "labels" / "labels.jsonl").read_text().splitlines()]
    assert len(recs) == len(pool) and res["parse_rate"] == 1.0
    assert sum(r["retried"] for r in recs) == 1 and oracle.seen["strict"] == 1, "one stricter-prompt retry"
    for r, (_, row) in zip(recs, pool.iterrows()):
        ref = reference_answer(row)
        assert (r["verdict"], r["type"], r["location"], r["reason"]) == (ref.verdict, ref.defect_type, ref.location,
                                                                          ref.reason)
    u = res["usage"]
    assert u["requests"] == len(pool) + 1 and u["prompt_tokens"] == 100 * u["requests"]
    assert u["cost_usd"] == pytest.approx((100 * 2.5 + 20 * 10.0) * u["requests"] / 1e6)
    assert u["structured_output"] is True and oracle.seen["schema"] > 0
    ev = run_evaluate(p, "teacher", tdir, tiny_manifest, tmp_path / "eval", tmp_path / "em.json")
    assert ev["auroc"] == 1.0 and ev["type_accuracy"] == 1.0 and ev["location_accuracy"] == 1.0
    assert ev["reason_names_type_and_location"] == 1.0 and ev["reason_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert ev["type_accuracy_per_type"] and ev["auroc_lm_alone"] is None
    for f in tmp_path.rglob("*"):  # the key is in no artifact, report, metric, descriptor, or log line
        if f.is_file():
            assert KEY not in f.read_text(errors="ignore"), f
    assert KEY not in caplog.text


def test_openai_server_without_json_schema_falls_back_to_the_parser(oracle, tiny_params, tiny_manifest, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("EDGEQA_TEST_KEY", KEY)
    oracle.refuse_schema = True
    p = _openai_params(tiny_params, oracle.url)
    tdir = tmp_path / "teacher"
    run_teacher_sft(p, tmp_path / "unused", tiny_manifest, tdir)
    res = run_label(p, tdir, tiny_manifest, tmp_path / "labels")
    assert res["parse_rate"] == 1.0 and res["usage"]["structured_fallbacks"] >= 1
    assert res["usage"]["structured_output"] is False


def test_openai_wrong_key_or_endpoint_down_gives_a_clear_error_naming_the_endpoint(oracle, tiny_params,
                                                                                   tiny_manifest, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("EDGEQA_TEST_KEY", "sk-wrong-key-xyz")
    p = _openai_params(tiny_params, oracle.url)
    tdir = tmp_path / "teacher"
    run_teacher_sft(p, tmp_path / "unused", tiny_manifest, tdir)
    with pytest.raises(StageError) as e:
        run_label(p, tdir, tiny_manifest, tmp_path / "labels")
    assert oracle.url in str(e.value) and "401" in str(e.value) and "sk-wrong-key-xyz" not in str(e.value)
    assert "EDGEQA_TEST_KEY" in str(e.value)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    p = _openai_params(tiny_params, dead, max_retries=1, timeout_s=2)
    run_teacher_sft(p, tmp_path / "unused", tiny_manifest, tmp_path / "t2")
    with pytest.raises(StageError, match=r"could not be reached after 1 retries") as e:
        run_label(p, tmp_path / "t2", tiny_manifest, tmp_path / "labels2")
    assert dead in str(e.value)
    monkeypatch.delenv("EDGEQA_TEST_KEY")
    with pytest.raises(StageError, match="EDGEQA_TEST_KEY .* is not set"):
        run_label(p, tmp_path / "t2", tiny_manifest, tmp_path / "labels3")


def _tiny_blip2(folder, tokenizer_dir):
    """A BLIP-2 with random weights (NOT a trained model): Lite vision, 1-layer Q-Former, a 1-layer Llama LM
    on the SmolLM2 tokenizer (the only tokenizer on disk offline)."""
    import torch
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        LlamaConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    proc = Blip2Processor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok, num_query_tokens=4)
    cfg = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, encoder_hidden_size=32, vocab_size=100).to_dict(),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2).to_dict(),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)


def test_hf_backend_runs_a_blip2_folder_end_to_end_code_path_only(tiny_params, tiny_manifest, base_lm_dir, tmp_path):
    model = tmp_path / "blip2"
    _tiny_blip2(model, base_lm_dir)
    hf = tiny_params.teacher.hf.model_copy(update={"path": str(model), "max_new_tokens": 12})
    p = tiny_params.model_copy(update={"teacher": tiny_params.teacher.model_copy(update={"backend": "hf", "hf": hf}),
                                       "label": tiny_params.label.model_copy(update={"batch_size": 8})})
    tdir = tmp_path / "teacher"
    run_teacher_sft(p, tmp_path / "unused", tiny_manifest, tdir)
    assert json.loads((tdir / "teacher.json").read_text())["backend"] == "hf"
    res = run_label(p, tdir, tiny_manifest, tmp_path / "labels", tmp_path / "m.json", tmp_path / "r.md")
    recs = [json.loads(x) for x in (tmp_path / "labels" / "labels.jsonl").read_text().splitlines()]
    df = pd.read_parquet(tiny_manifest)
    assert len(recs) == int(df.split.isin(p.label.pools).sum()) == res["images"]
    # Random weights babble: the answers mostly do not map into the schema. Each failure was retried once with
    # the stricter prompt, and is counted and shown with its text, never dropped or guessed.
    fails = [r for r in recs if not r["parse_ok"]]
    assert res["parse_failures"] == len(fails) and all(r["retried"] for r in fails)
    assert all(r["verdict"] is None and r["raw_text"] is not None for r in fails)
    if fails:
        assert "Answers that did not parse" in (tmp_path / "r.md").read_text()
    assert all(0 < r["generated_tokens"] <= 12 for r in recs)
    assert res["usage"]["model_type"] == "blip-2"


def test_hf_path_that_is_not_a_model_folder_is_refused(tiny_params, tiny_manifest, tmp_path):
    hf = tiny_params.teacher.hf.model_copy(update={"path": str(tmp_path)})
    p = tiny_params.model_copy(update={"teacher": tiny_params.teacher.model_copy(update={"backend": "hf", "hf": hf})})
    with pytest.raises(StageError, match=r"is not a Hugging Face model folder \(no config.json\)"):
        run_teacher_sft(p, tmp_path / "unused", tiny_manifest, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()
