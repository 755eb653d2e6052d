"""Stage `teacher_sft`: domain SFT of the local teacher on the labelled split (or an hf/openai descriptor)."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.stage import output_args, stage_main
from edgeqa.teacher import sft


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--base-lm", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    output_args(ap, "teacher folder to write")
    ap.add_argument("--live", type=Path, help="DVCLive folder for the training curves")


def _run(p: Params, a: argparse.Namespace) -> None:
    sft.run(p.teacher, p.ingest.defect_types, a.base_lm, a.manifest, a.out, a.metrics, a.report, a.live)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
