"""Stage `ingest`: one manifest row per image of the dataset at `ingest.root`."""

import argparse
from pathlib import Path

from edgeqa.config import Params
from edgeqa.data import ingest
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    output_args(ap, "output folder for manifest.parquet")


def _run(p: Params, a: argparse.Namespace) -> None:
    cfg = p.ingest
    ingest.run(cfg, Path(cfg.root), a.out, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
