"""`edgeqa review` batches: checked before anything is written, ingested into `labelled` after the fixed cut
(no existing image moves), and the manifest passes the same GX suites the `validate` stage runs."""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from edgeqa.data import ingest, review, validate
from edgeqa.data.manifest import COLUMNS
from edgeqa.errors import StageError

from .helpers import img, mvtec


@pytest.fixture
def cfg(params, tmp_path):
    return params.ingest.model_copy(update={"dataset": "toy", "defect_types": ["dent", "scratch"],
                                            "reviews": str(tmp_path / "reviews")})


def _ingest(cfg, root, out) -> pd.DataFrame:
    ingest.run(cfg, root, out, out / "metrics.json", out / "report.md")
    return pd.read_parquet(out / "manifest.parquet")


def _line(tmp_path) -> Path:
    """What the line sent for review, in the folder layout: new images (values no dataset image has)."""
    line = tmp_path / "line"
    for i in range(3):
        img(line / "good" / f"g{i}.png", value=40 + i)
    for i in range(2):
        img(line / "scratch" / f"s{i}.png", value=90 + i)
    return line


def test_a_review_joins_labelled_and_no_dataset_image_moves(cfg, params, tmp_path):
    root = mvtec(tmp_path / "ds", goods=20, per=20)
    before = _ingest(cfg, root, tmp_path / "a")
    reviews = Path(cfg.reviews)
    res = review.add(_line(tmp_path), cfg, reviews, tmp_path / "a" / "manifest.parquet", reviewer="qa-anna")
    assert (res["images"], res["good"], res["defective"]) == (5, 3, 2)
    batch = res["path"]
    table = pd.read_csv(batch / "verdicts.csv", dtype=str, keep_default_na=False)
    assert set(table.reviewer) == {"qa-anna"} and set(table.category) == {"widget"}
    assert sorted(table.defect_type) == ["", "", "", "scratch", "scratch"]
    assert all((batch / "images" / f).is_file() for f in table.file)

    after = _ingest(cfg, root, tmp_path / "b")
    assert list(after.columns) == list(COLUMNS)
    old = after[after.source == "dataset"].set_index("relpath")
    assert old.split.equals(before.set_index("relpath").split.loc[old.index])  # nothing moved
    new = after[after.source == "review"]
    assert len(new) == 5 and set(new.split) == {"labelled"}
    assert set(new.relpath.str.split("/").str[1]) == {batch.name}
    assert sorted(new.defect_type.fillna("")) == ["", "", "", "scratch", "scratch"]
    assert new[new.label == "defective"].mask_path.isna().all()
    assert "defect" in new[new.label == "defective"].reason.iloc[0]
    m = (tmp_path / "b" / "metrics.json").read_text()
    assert '"reviewed": 5' in m and '"split_labelled": ' + str((after.split == "labelled").sum()) in m

    # the same GX suites validate runs: a reviewed defective image has no mask, and the cut's fractions
    # are measured on the dataset's own images
    rep = validate.run(cfg, params.validate_cfg, tmp_path / "b" / "manifest.parquet", tmp_path / "docs")
    assert rep.success
    # ...and a reviewed image outside labelled is refused by them
    bad = after.copy()
    bad.loc[bad.source == "review", "split"] = "test"
    bad.to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(StageError, match="split"):
        validate.run(cfg, params.validate_cfg, tmp_path / "bad.parquet", tmp_path / "docs2")


def test_every_bad_verdict_is_named_and_nothing_is_written(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    _ingest(cfg, root, tmp_path / "a")
    manifest = tmp_path / "a" / "manifest.parquet"
    test_img = root / pd.read_parquet(manifest).query("split == 'test'").relpath.iloc[0]
    ok = img(tmp_path / "in" / "ok.png", value=33)
    tiny = img(tmp_path / "in" / "tiny.png", size=(8, 8))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    csv = tmp_path / "in" / "verdicts.csv"
    csv.write_text("image,verdict,defect_type\n"
                   "ok.png,defective,crack\n"            # line 2: not one of the dataset's types
                   "ok.png,maybe,\n"                     # line 3: verdict
                   f"{test_img},good,\n"                 # line 4: a test image would leak into training
                   "tiny.png,good,\n"                    # line 5: size
                   "broken.png,good,\n"                  # line 6: corrupt
                   "missing.png,good,\n"                 # line 7: no file
                   "ok.png,good,scratch\n")              # line 8: a good image with a type
    reviews = Path(cfg.reviews)
    with pytest.raises(StageError) as ei:
        review.add(csv, cfg, reviews, manifest, reviewer="x")
    msg = str(ei.value)
    assert "7 problem(s); nothing was written" in msg, msg
    for needle in (f"{csv} line 2: defect_type 'crack'", f"{csv} line 3: verdict 'maybe'",
                   f"already in the dataset as {test_img.relative_to(root)} (split test)", "tiny.png: image size 8x8",
                   "broken.png: corrupt", f"{csv} line 7: no such image", f"{csv} line 8: a good image has no"):
        assert needle in msg, (needle, msg)
    assert not reviews.exists() or not any(reviews.iterdir())

    # a CSV without the verdict column, and the same image reviewed twice
    (tmp_path / "in" / "cols.csv").write_text("image\nok.png\n")
    with pytest.raises(StageError, match=r"missing the column\(s\) \['verdict'\]"):
        review.add(tmp_path / "in" / "cols.csv", cfg, reviews, manifest)
    (tmp_path / "in" / "ok.csv").write_text("image,verdict\nok.png,good\n")
    review.add(tmp_path / "in" / "ok.csv", cfg, reviews, manifest)
    with pytest.raises(StageError, match="already reviewed in"):
        review.add(tmp_path / "in" / "ok.csv", cfg, reviews, manifest)


def test_ingest_refuses_an_edited_or_missing_review_batch(cfg, tmp_path):
    root = mvtec(tmp_path / "ds")
    _ingest(cfg, root, tmp_path / "a")
    res = review.add(_line(tmp_path), cfg, Path(cfg.reviews), tmp_path / "a" / "manifest.parquet")
    one = sorted((res["path"] / "images").iterdir())[0]
    with Image.open(one) as im:
        im.rotate(90).save(one)
    with pytest.raises(StageError, match="content differs from the sha256 its review recorded"):
        _ingest(cfg, root, tmp_path / "b")
    assert not (tmp_path / "b" / "manifest.parquet").exists()
    # a batch tracked by DVC but not pulled into this workspace
    (Path(cfg.reviews) / "20990101T000000Z-abcd.dvc").write_text("outs:\n- path: 20990101T000000Z-abcd\n")
    with pytest.raises(StageError, match=r"dvc pull .*20990101T000000Z-abcd.dvc"):
        _ingest(cfg, root, tmp_path / "c")


def test_a_reviewed_image_that_the_dataset_gains_later_keeps_the_dataset_answer(cfg, tmp_path):
    root = mvtec(tmp_path / "ds", goods=20, per=10)
    _ingest(cfg, root, tmp_path / "a")
    line = _line(tmp_path)
    review.add(line, cfg, Path(cfg.reviews), tmp_path / "a" / "manifest.parquet")
    # later the dataset itself gains one of those images (as a test image of the dataset)
    dup = root / "widget" / "test" / "scratch" / "900.png"
    dup.write_bytes((line / "scratch" / "s0.png").read_bytes())
    (root / "widget" / "ground_truth" / "scratch" / "900_mask.png").write_bytes(
        (root / "widget" / "ground_truth" / "scratch" / "000_mask.png").read_bytes())
    df = _ingest(cfg, root, tmp_path / "b")
    assert df.sha256.is_unique
    row = df[df.relpath == "widget/test/scratch/900.png"].iloc[0]
    assert row.source == "dataset"
    assert (df.source == "review").sum() == 4
    assert '"reviewed_duplicates": 1' in (tmp_path / "b" / "metrics.json").read_text()


def test_the_cli_says_how_to_finish_a_batch_it_could_not_track(params, tmp_path):
    """`edgeqa review --no-push` in a project that is no DVC repository: the checked batch is written in full,
    `dvc add` fails, and the error names the batch and the commands that finish or withdraw it."""
    import shutil

    from typer.testing import CliRunner

    from edgeqa.cli import app

    from ..conftest import REPO

    proj = tmp_path / "proj"
    proj.mkdir()
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / f, proj / f)
    line = _line(tmp_path)
    r = CliRunner().invoke(app, ["--project", str(proj), "review", str(line), "--category", "bottle", "--no-push",
                                 "--reviewer", "qa"], env={"COLUMNS": "250"})
    out = " ".join(r.output.split())
    assert r.exit_code == 2, out
    batches = [p for p in (proj / "data" / "reviews").iterdir() if p.is_dir()]
    assert len(batches) == 1 and len(list((batches[0] / "images").iterdir())) == 5
    rel = f"data/reviews/{batches[0].name}"
    assert "dvc add" in out and f"the batch is written in full at {rel}" in out, out
    assert f"rm -r {rel}" in out
