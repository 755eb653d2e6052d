from pathlib import Path

import pytest

from edgeqa import benchrec
from edgeqa.io import atomic_dir, atomic_write_text
from edgeqa.report import md_table


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]


def test_atomic_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "x").write_text("1")
    assert (final / "x").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "y").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["x"], "a failed build must not touch the published dir"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temp dir left behind"


def test_md_table_marks_missing_values_na():
    t = md_table(["a", "b"], [[1, None], [0.123456, "x|y"]])
    assert "| 1 | n/a |" in t and "0.1235" in t and "x\\|y" in t


def test_bench_record_format(tmp_path):
    r = benchrec.record("x", 1.23456, "s", "<= 2 s", "make bench")
    assert tuple(r) == benchrec.FIELDS
    p = tmp_path / "b.json"
    benchrec.write(p, [r])
    benchrec.write(p, [benchrec.record("y", 2, "s", None, "c")])
    import json

    names = [x["name"] for x in json.loads(p.read_text())["records"]]
    assert names == ["x", "y"]


def test_pareto_plot_is_a_png_written_by_rename(tmp_path):
    from PIL import Image

    from edgeqa.bench import pareto_png

    out = tmp_path / "models_pareto.png"
    pareto_png({"teacher": (3000.0, 0.88), "baseline": (150.0, 0.99), "edge": (45.0, 0.99)}, out, "t")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (900, 560)
    assert [p.name for p in tmp_path.iterdir()] == ["models_pareto.png"]


def test_progress_logs_at_most_every_interval_and_at_the_end(caplog):
    import logging

    from edgeqa.progress import Progress

    log = logging.getLogger("edgeqa.test_progress")
    p = Progress(log, "label", 10, "images", every_s=3600)
    with caplog.at_level(logging.INFO, logger="edgeqa.test_progress"):
        for i in range(1, 10):
            p.update(i, loss=0.5)
        assert not caplog.records, "nothing before the interval has passed"
        p.update(10, loss=0.25)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith("label: 10/10 images (100 %), loss 0.25,") and "elapsed" in msg and "ETA" not in msg
    p0 = Progress(log, "train", 200, "steps", every_s=0)
    mid = p0.line(50, p0.t0 + 10.0)
    assert "50/200 steps (25 %)" in mid and "5 steps/s" in mid and "ETA 0m30s" in mid


def test_the_bench_copy_keeps_a_data_root_outside_the_project_reachable(tmp_path):
    """mtile's `ingest.root: ../shared/...` must still resolve from the bench's temp copy; a root inside the
    project (a stage's output, data/synth) stays relative, so the copy's DAG is unchanged."""
    import subprocess

    import yaml

    from edgeqa.bench import _copy_project
    from edgeqa.config import load_params

    here = Path(__file__).resolve().parents[2] / "params.yaml"
    for root_value, outside in (("../shared/datasets/magnetic-tile", True), ("data/synth", False)):
        src = tmp_path / root_value.split("/")[0].strip(".") / "proj"
        src.mkdir(parents=True)
        p = yaml.safe_load(here.read_text())
        p["ingest"]["root"] = root_value
        (src / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        subprocess.run(["git", "init", "-q"], cwd=src, check=True)
        copy = _copy_project(tmp_path / f"copy-{outside}", src)
        got = load_params(copy / "params.yaml").ingest.root
        want = str((src / root_value).resolve()) if outside else root_value
        assert got == want


def test_a_bench_child_reports_its_own_peak_rss_not_its_parents():
    import subprocess
    import sys

    import numpy as np

    big = np.ones(400 * 2**20 // 8)  # the parent holds 400 MiB when it starts the child
    code = "from edgeqa.benchmodel import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert big.sum() > 0 and child < 300 * 2**20, f"the child reported {child / 2**20:.0f} MiB"
