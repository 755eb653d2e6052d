"""Stage `retention`: every evaluated model beside the teacher and the baseline, as retention ratios."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.evaluation import retention
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--evaluations", required=True, type=Path, help="the evaluate reports folder (one per model)")
    output_args(ap, out=None)


def _run(p: Params, a: argparse.Namespace) -> None:
    e = p.evaluate
    retention.run(e.models, e.split, a.evaluations, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
