"""Stage `gate`: the release rules of params.yaml (`gate`) checked on the evaluate reports of the edge candidate,
the teacher and the baseline, and on the bundle itself. Always exits 0 on a verdict; the report says
passed or refused, rule by rule."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.release import gate
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--evaluations", required=True, type=Path, help="the evaluate reports folder (one per model)")
    ap.add_argument("--bundle", required=True, type=Path, help="the candidate's edge bundle folder")
    ap.add_argument("--report-json", required=True, type=Path, help="the full gate report (JSON)")
    output_args(ap, out=None)


def _run(p: Params, a: argparse.Namespace) -> None:
    gate.run(p.gate, a.evaluations, a.bundle, a.metrics, a.report, a.report_json)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
