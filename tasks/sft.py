"""Stages `sft` and `baseline` (`--role baseline`: the teacher's weight forced to 0, the same step budget)."""

import argparse
import sys

from edgeqa.config import Params
from edgeqa.distributed import torchrun_or_here
from edgeqa.stage import stage_main, student_stage_args
from edgeqa.student import sft


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--role", choices=["sft", "baseline"], default="sft")
    student_stage_args(ap)


def _run(p: Params, a: argparse.Namespace) -> None:
    sft.run(p.sft, p.student, p.ingest.defect_types, p.ingest.mask_facts, a.role, a.base_lm, a.teacher, a.manifest,
            a.labels, a.features, a.out, a.metrics, a.report, a.live)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_main(__doc__, torchrun_or_here("tasks.sft", argv, _run), _args, argv)


if __name__ == "__main__":
    main()
