"""Stage `synth`: the offline default data, a deterministic generator in the MVTec AD layout."""

import argparse

from edgeqa.config import Params
from edgeqa.data import synth
from edgeqa.stage import output_args, stage_main


def _args(ap: argparse.ArgumentParser) -> None:
    output_args(ap, "dataset root to write (MVTec layout)")


def _run(p: Params, a: argparse.Namespace) -> None:
    synth.run(p.synth, a.out, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
