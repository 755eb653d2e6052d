"""Stage `validate`: Great Expectations suites on the manifest, a decode check of every file, Data Docs."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.data import validate
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--docs", required=True, type=Path, help="Data Docs output folder")
    output_args(ap, out=None)


def _run(p: Params, a: argparse.Namespace) -> None:
    validate.run(p.ingest, p.validate_cfg, a.manifest, a.docs, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
