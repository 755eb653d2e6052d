"""The stage contract's command line: what every `tasks/<stage>.py` shares. A stage's main() parses
`--params` and its paths from dvc.yaml, loads params once, and calls one library function; a refused input
exits 2 with the message, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeqa.config import Params, ParamsError, load_params
from edgeqa.errors import StageError


def output_args(p: argparse.ArgumentParser, out: str | None = "output folder") -> None:
    """The outputs every stage CLI takes from dvc.yaml: --out (unless None), --metrics, --report."""
    if out is not None:
        p.add_argument("--out", required=True, type=Path, help=out)
    p.add_argument("--metrics", type=Path, help="metrics JSON (DVC metrics)")
    p.add_argument("--report", type=Path, help="markdown report (published by the Prefect flow)")


def stage_main(description: str, run: Callable[[Params, argparse.Namespace], object],
               add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> None:
    """Parse args, configure logging, load params, run; map refused input to exit 2 with its message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("edgeqa").setLevel(logging.INFO)
    try:
        run(load_params(args.params), args)
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def student_stage_args(ap: argparse.ArgumentParser) -> None:
    """The inputs and outputs every student training stage (baseline, sft, distill) takes from dvc.yaml."""
    ap.add_argument("--base-lm", required=True, type=Path)
    ap.add_argument("--teacher", required=True, type=Path)
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--labels", required=True, type=Path)
    ap.add_argument("--features", required=True, type=Path, help="the student_features folder")
    output_args(ap, "student folder to write")
    ap.add_argument("--live", type=Path, help="DVCLive folder for the training curves")
