"""Stage `distill`: knowledge distillation from the teacher into the sft student."""

import argparse
import sys
from pathlib import Path

from edgeqa.config import Params
from edgeqa.distributed import torchrun_or_here
from edgeqa.stage import stage_main, student_stage_args
from edgeqa.student import distill


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sft", required=True, type=Path, help="the sft student folder to start from")
    student_stage_args(ap)


def _run(p: Params, a: argparse.Namespace) -> None:
    distill.run(p.distill, p.student, a.sft, a.base_lm, a.teacher, a.manifest, a.labels, a.features, a.out,
                a.metrics, a.report, a.live)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_main(__doc__, torchrun_or_here("tasks.distill", argv, _run), _args, argv)


if __name__ == "__main__":
    main()
