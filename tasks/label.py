"""Stage `label`: the teacher labels the labelled and unlabelled pools (resumable)."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.stage import output_args, stage_main
from edgeqa.teacher import label


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--teacher", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    output_args(ap, "labels folder (labels.jsonl and its resume cache)")


def _run(p: Params, a: argparse.Namespace) -> None:
    t = p.teacher
    label.run(p.label, t.max_reason_tokens, t.top_k, t.threads, a.teacher, a.manifest, a.out, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
