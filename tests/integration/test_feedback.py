"""`edgeqa feedback push` against the session's SeaweedFS: a prediction log checked line by line, uploaded under
feedback/<device>/ content-addressed (a second push of the same log stores nothing new), the local log rotated;
a bad line refused by its line number with nothing uploaded."""

import json
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from edgeqa.feedback import batches
from edgeqa_runtime.predlog import Appender, entry

from ..conftest import REPO

pytestmark = [pytest.mark.integration]
REC = {"verdict": "good", "type": "none", "location": "none", "p_defective": 0.02, "bundle": "2026.12.03-x"}


def _log(path, img, n):
    app = Appender(path)
    for _ in range(n):
        app.write(entry(img, REC))
    app.close()
    return path


def test_feedback_push_uploads_once_rotates_and_refuses_a_bad_line(tmp_path, stack, cli):
    import os

    bucket = os.environ["EDGEQA_RELEASES_BUCKET"]
    s3 = stack.s3_client()
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(img)
    log = _log(tmp_path / "predictions.jsonl", img, 3)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(log.read_bytes())

    out = " ".join(cli(REPO, "feedback", "push", str(log), "--device", "line-7").split())
    assert "3 predictions uploaded: s3://" in out and not log.exists()
    assert list(tmp_path.glob("predictions.jsonl.*.pushed"))
    [obj] = batches(s3, bucket, "line-7")
    body = s3.get_object(Bucket=bucket, Key=obj["key"])["Body"].read().decode().splitlines()
    assert [json.loads(x)["image_sha256"] for x in body] == [json.loads(x)["image_sha256"]
                                                              for x in copy.read_text().splitlines()]
    out = " ".join(cli(REPO, "feedback", "push", str(copy), "--device", "line-7", "--no-rotate").split())
    assert "already there" in out and copy.exists() and len(batches(s3, bucket, "line-7")) == 1

    lines = copy.read_text().splitlines()
    lines[1] = json.dumps(dict(json.loads(lines[1]), verdict="maybe"))
    copy.write_text("\n".join(lines) + "\n")
    out = " ".join(cli(REPO, "feedback", "push", str(copy), "--device", "line-8", code=2).split())
    assert "copy.jsonl:2: verdict 'maybe'; allowed: good, defective; nothing was uploaded" in out
    assert batches(s3, bucket, "line-8") == [] and copy.exists()
    out = " ".join(cli(REPO, "feedback", "push", str(copy), "--device", "../etc", code=2).split())
    assert "--device '../etc'" in out


@pytest.mark.slow
def test_the_loop_back_predict_push_and_drift_with_a_notification(tiny_repo, tmp_path, stack, cli, webhook):
    """The tiny edge bundle answers test images with a prediction log; pushed; `edgeqa drift` finds no drift
    against evaluate@edge on those same images. Then a camera with another resolution: drift, exit 3, a
    notification through the webhook block, and the report."""
    import shutil

    import pandas as pd
    import yaml
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    url, got = webhook
    proj = tmp_path / "proj"  # what the drift check reads: params, the reference answers, the manifest, flows
    for rel in ("dvc.yaml", "params.yaml", "infra/stack.yaml", "flows/__init__.py", "flows/drift.py",
                "reports/evaluate/edge/predictions.jsonl", "data/ingest/manifest.parquet"):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_repo / rel, proj / rel)
    shutil.copytree(tiny_repo / "models" / "edge", proj / "models" / "edge")  # the embeddings' reference model
    for d in ("data/synth",):  # the training images the image rules sample (manifest paths are relative)
        shutil.copytree(tiny_repo / d, proj / d)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["ops"]["drift"]["min_batch"] = 10
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    df = pd.read_parquet(proj / "data" / "ingest" / "manifest.parquet")
    test = [tiny_repo / p for p in df[df.split == "test"].path]
    line = tmp_path / "line"
    line.mkdir()
    for i, p in enumerate(test):
        shutil.copy(p, line / f"{i:03d}.png")
    log = tmp_path / "predictions.jsonl"
    bundle = str(tiny_repo / "models" / "edge")
    cli(proj, "predict", "--bundle", bundle, str(line), "--out", str(tmp_path / "a.jsonl"), "--log", str(log),
        "--no-progress")
    cli(proj, "feedback", "push", str(log), "--device", "loop-cam")
    cli(proj, "notify", "set-webhook", url)
    try:
        out = " ".join(cli(proj, "drift", "--device", "loop-cam").split())
        assert f"no drift in {len(test)} answers" in out, out
        rep = json.loads((proj / "reports" / "drift" / "report.json").read_text())
        assert rep["drifted"] is False and rep["rules"][0]["value"] < 0.25 and got == []
        # the test images against the training sample: brightness, contrast and embedding compared, within
        rules = {r["rule"]: r for r in rep["rules"]}
        assert all(rules[k]["passed"] is True for k in ("brightness_shift", "contrast_shift", "embedding_shift")), rules

        cam2 = tmp_path / "cam2"  # another camera: the same scenes at another resolution
        cam2.mkdir()
        for p in sorted(line.iterdir()):
            with Image.open(p) as im:
                im.resize((im.width + 64, im.height)).save(cam2 / p.name)
        cli(proj, "predict", "--bundle", bundle, str(cam2), "--out", str(tmp_path / "b.jsonl"), "--log", str(log),
            "--no-progress")
        cli(proj, "feedback", "push", str(log), "--device", "loop-cam")
        out = " ".join(cli(proj, "drift", "--device", "loop-cam", code=3).split())
        assert "unseen_size_share 0.5 > 0.05" in out, out
        rep = json.loads((proj / "reports" / "drift" / "report.json").read_text())
        assert rep["drifted"] is True and rep["n"] == 2 * len(test) and len(rep["logs"]) == 2
        assert len(got) == 1 and got[0]["subject"].startswith("edgeqa: drift on the line")
        assert "unseen_size_share" in got[0]["body"]

        # a dimmer lamp on a third line: the same scenes at the same size, darker. The log now carries each
        # image's brightness, contrast and embedding; drift compares them with the training images'.
        dim = tmp_path / "dim"
        dim.mkdir()
        for p in sorted(line.iterdir()):
            with Image.open(p) as im:
                ImageEnhance.Brightness(im).enhance(0.4).save(dim / p.name)
        log3 = tmp_path / "dim.jsonl"
        cli(proj, "predict", "--bundle", bundle, str(dim), "--out", str(tmp_path / "c.jsonl"), "--log", str(log3),
            "--no-progress")
        first = json.loads(log3.read_text().splitlines()[0])
        assert first["brightness"] < 100 and len(first["embedding"]) > 8
        cli(proj, "feedback", "push", str(log3), "--device", "dim-cam")
        out = " ".join(cli(proj, "drift", "--device", "dim-cam", code=3).split())
        rep = json.loads((proj / "reports" / "drift" / "report.json").read_text())
        rules = {r["rule"]: r for r in rep["rules"]}
        assert rules["brightness_shift"]["passed"] is False and rules["unseen_size_share"]["passed"], out
        assert rules["embedding_shift"]["value"] is not None, rules["embedding_shift"]
    finally:
        CustomWebhookNotificationBlock.delete("edgeqa-notify")


@pytest.mark.slow
def test_the_loop_closes_review_into_labelled_then_retrain(tiny_repo, tmp_path, stack, cli):
    """After predict, push and drift: a reviewer's verdicts on new images from the line become a new DVC data
    version (`edgeqa review`: dvc add, push to the S3 remote, a git commit of its .dvc file alone). A fresh clone
    pulls the batch from S3, as a nightly checkout does. `dvc repro baseline` then ingests it into `labelled`
    (no dataset image moves) and retrains on it. A test image offered for review is refused (it would leak)."""
    import shutil
    import subprocess

    import pandas as pd

    work = tmp_path / "work"  # the reproduced tiny project, its DVC cache shared (read) with the session's
    shutil.copytree(tiny_repo, work, symlinks=True,
                    ignore=lambda d, names: ["cache", "tmp"] if Path(d) == tiny_repo / ".dvc" else [])
    dvc = ["dvc"]

    def run(*cmd, cwd=work):
        r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run(*dvc, "cache", "dir", "--local", str(tiny_repo / ".dvc" / "cache"))
    run("git", "add", "-A")
    run("git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", "commit", "-qm", "reproduced")
    assert "Data and pipelines are up to date" in run(*dvc, "status", "baseline")
    before = pd.read_parquet(work / "data" / "ingest" / "manifest.parquet")
    base_before = json.loads((work / "reports" / "baseline" / "metrics.json").read_text())

    # the line's new images: test scenes seen mirrored (new content), verdicts from the reviewer (the truth)
    line = tmp_path / "line"
    line.mkdir()
    rows = ["image,verdict,defect_type,category,note"]
    test = before[before.split == "test"].head(6)
    for i, r in enumerate(test.itertuples()):
        with Image.open(work / r.path) as im:
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(line / f"{i:03d}.png")
        rows.append(f"{i:03d}.png,{r.label},{'' if pd.isna(r.defect_type) else r.defect_type},{r.category},"
                    "uncertain on the line")
    (line / "verdicts.csv").write_text("\n".join(rows) + "\n")
    leak = line / "leak.csv"
    good_test = before[(before.split == "test") & (before.label == "good")].iloc[0]
    leak.write_text(f"image,verdict,category\n{work / good_test.path},good,{good_test.category}\n")
    out = " ".join(cli(work, "review", str(leak), "--reviewer", "qa-anna", code=2).split())
    assert "(split test)" in out and "nothing was written" in out, out

    head = run("git", "rev-parse", "HEAD").strip()
    out = " ".join(cli(work, "review", str(line / "verdicts.csv"), "--reviewer", "qa-anna").split())
    assert "6 images" in out and "pushed to the DVC remote" in out and "committed" in out, out
    dvc_files = list((work / "data" / "reviews").glob("*.dvc"))
    assert len(dvc_files) == 1
    batch = dvc_files[0].stem
    assert run("git", "rev-parse", "HEAD~1").strip() == head  # one commit, holding the .dvc file and .gitignore
    assert sorted(run("git", "show", "--name-only", "--format=", "HEAD").split()) == sorted(
        [f"data/reviews/{batch}.dvc", "data/reviews/.gitignore"])
    assert "review" in run("git", "log", "-1", "--format=%s")

    # a fresh clone (what a nightly checkout is) pulls the batch from the S3 remote
    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(work), str(clone), cwd=tmp_path)
    stack.configure_dvc(clone)
    run(*dvc, "pull", "--run-cache", "--allow-missing", cwd=clone)  # the nightly checkout's own pull
    assert len(list((clone / "data" / "reviews" / batch / "images").iterdir())) == 6

    # retrain: ingest adds the batch to labelled, nothing moves, baseline trains on more human answers
    assert "changed deps" in run(*dvc, "status", "ingest")
    run(*dvc, "repro", "baseline")
    after = pd.read_parquet(work / "data" / "ingest" / "manifest.parquet")
    old = after[after.source == "dataset"].set_index("relpath").split
    assert old.equals(before.set_index("relpath").split.loc[old.index]) and len(old) == len(before)
    new = after[after.source == "review"]
    assert len(new) == 6 and set(new.split) == {"labelled"}
    assert (new.relpath.str.split("/").str[1] == batch).all()
    base_after = json.loads((work / "reports" / "baseline" / "metrics.json").read_text())
    human = base_after["examples_by_source"]["human"] - base_before["examples_by_source"]["human"]
    assert human >= 6, (base_before["examples_by_source"], base_after["examples_by_source"])
