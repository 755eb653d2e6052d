"""Stage `prune`: structured pruning (torch-pruning) of the best student, each step recovered by KD."""

import argparse
from pathlib import Path

from edgeqa.compress import prune
from edgeqa.config import Params
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", required=True, type=Path, help="the models folder (baseline, sft, distill)")
    ap.add_argument("--reports", required=True, type=Path, help="the reports folder (each student's val AUROC)")
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--labels", required=True, type=Path, help="the teacher's labels (recovery's soft targets)")
    ap.add_argument("--features", required=True, type=Path, help="the student_features folder")
    output_args(ap, "the pruned student folder to write")
    ap.add_argument("--live", type=Path, help="DVCLive folder for the per-step figures")


def _run(p: Params, a: argparse.Namespace) -> None:
    prune.run(p.prune, p.student, a.models, a.reports, a.manifest, a.labels, a.features, a.out, a.metrics, a.report,
              a.live)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
