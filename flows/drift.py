"""Prefect flow `edgeqa-drift`: the prediction logs the line pushed (`edgeqa feedback push`) against what the
released model answered on `test`, and against the training images: their sizes, brightness, contrast and
mean embedding under models/edge (`edgeqa.drift`). It writes
reports/drift/report.{json,md}, publishes the report as an artifact, and sends a notification through
`ops.notify_block` when a rule in `ops.drift` fails. `edgeqa drift` runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from edgeqa import drift as drift_lib
from edgeqa import feedback
from edgeqa.config import load_params
from edgeqa.io import atomic_write_text
from edgeqa.notify import notify, send
from edgeqa.stack import Stack, StackConfig


@flow(name="edgeqa-drift", log_prints=True, on_failure=[notify], on_crashed=[notify])
def drift(repo: str = ".", device: str | None = None) -> dict[str, Any]:
    """Check every uploaded prediction log (of `device`, or all) for drift; the report."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    params = load_params(root / "params.yaml")
    preds = root / params.paths.reports_dir / "evaluate" / "edge" / "predictions.jsonl"
    manifest = root / params.paths.ingest_dir / "manifest.parquet"
    for f in (preds, manifest):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: run the pipeline first (`make run`); drift is measured "
                                    "against what the released model answered on test")
    reference = [r for r in map(json.loads, preds.read_text().splitlines()) if r.get("split", "test") == "test"]
    df = pd.read_parquet(manifest, columns=["split", "width", "height", "path"])
    train = df[df.split.isin(["labelled", "unlabelled"])]
    sizes = {(int(w), int(h)) for w, h in train[["width", "height"]].itertuples(index=False)}
    edge = root / params.paths.models_dir / "edge"
    image_ref = drift_lib.training_reference([str(root / p) for p in train.path], params.ops.drift.reference_images,
                                             edge if (edge / "manifest.json").is_file() else None)
    logger.info("image reference: %d training images, embeddings of bundle %s", image_ref["n"],
                image_ref["bundle"])
    stack = Stack(StackConfig.load(root))
    stack.check_s3()
    s3, bucket = stack.s3_client(), stack.cfg.buckets["releases"]
    keys = [b["key"] for b in feedback.batches(s3, bucket, device)]
    batch = feedback.load(s3, bucket, keys)
    logger.info("%d answers in %d prediction logs under s3://%s/feedback/%s", len(batch), len(keys), bucket,
                f"{device}/" if device else "")
    rep = drift_lib.check(params.ops.drift, reference, sizes, batch, image_ref)
    rep["logs"] = keys
    out = root / params.paths.reports_dir / "drift"
    out.mkdir(parents=True, exist_ok=True)
    md = drift_lib.render(rep)
    atomic_write_text(out / "report.json", json.dumps(rep, indent=1) + "\n")
    atomic_write_text(out / "report.md", md)
    create_markdown_artifact(key="drift-report", markdown=md, description=rep["summary"])
    logger.info(rep["summary"])
    if rep["drifted"]:
        rep["notified"] = send(params.ops.notify_block, f"edgeqa: drift on the line ({rep['n']} answers)",
                               md)
    return rep
