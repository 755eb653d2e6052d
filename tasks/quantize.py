"""Stage `quantize`: ONNX export of the pruned student, INT8 where it keeps the answers, and the edge bundle."""

import argparse
from pathlib import Path

from edgeqa.compress import quantize
from edgeqa.config import Params
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--src", required=True, type=Path, help="the pruned student folder")
    ap.add_argument("--manifest", required=True, type=Path)
    output_args(ap, "the edge bundle folder to write")


def _run(p: Params, a: argparse.Namespace) -> None:
    quantize.run(p.quantize, a.src, a.manifest, a.out, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
