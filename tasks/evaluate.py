"""Stage `evaluate@<model>` (a dvc.yaml foreach over evaluate.models): one model's answers on the held-out split."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.evaluation import evaluate
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="a name in evaluate.models")
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    output_args(ap, "folder for predictions.jsonl, roc.json and confusion.json")


def _run(p: Params, a: argparse.Namespace) -> None:
    evaluate.run(p.evaluate, list(p.ingest.mask_facts.size_classes), a.model, a.model_dir, a.manifest, a.out,
                 a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
