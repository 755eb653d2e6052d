"""`edgeqa feedback push` against the session's SeaweedFS: a prediction log checked line by line, uploaded under
feedback/<device>/ content-addressed (a second push of the same log stores nothing new), the local log rotated;
a bad line refused by its line number with nothing uploaded."""

import json

import pytest

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
    img.write_bytes(b"image bytes")
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
