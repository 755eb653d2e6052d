"""Stage `student_features`: the student's frozen trunk on every training-side image, once."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.stage import output_args, stage_main
from edgeqa.student import features


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--manifest", required=True, type=Path)
    output_args(ap, "features folder")


def _run(p: Params, a: argparse.Namespace) -> None:
    features.run(p.student, a.manifest, a.out, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
