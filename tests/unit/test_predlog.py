"""The prediction log's lines: written whole, read back checked, a crash's cut line skipped, a bad line named."""

import json

import pytest
from PIL import Image

from edgeqa_runtime.files import sha256_file
from edgeqa_runtime.predlog import FIELDS, Appender, LogError, check, entry, read

REC = {"verdict": "defective", "type": "crack", "location": "top-left", "p_defective": 0.91, "bundle": "v1"}


def _log(tmp_path, n=3):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(img)
    log = tmp_path / "logs" / "p.jsonl"
    app = Appender(log)
    for _ in range(n):
        app.write(entry(img, REC))
    app.close()
    return log, img


def test_lines_carry_the_image_hash_and_the_answer_and_append(tmp_path):
    log, img = _log(tmp_path)
    Appender(log).close()  # reopening appends, never truncates
    lines = list(read(log))
    assert len(lines) == 3 and set(lines[0]) == set(FIELDS) | {"brightness", "contrast"}
    assert lines[0]["brightness"] == 90.0 and lines[0]["contrast"] == 0.0  # the flat gray test image
    assert lines[0]["image_sha256"] == sha256_file(img) and lines[0]["verdict"] == "defective"
    assert lines[0]["ts"].endswith("+00:00") and (lines[0]["width"], lines[0]["height"]) == (64, 48)


def test_a_last_line_cut_by_a_crash_is_skipped_and_any_other_bad_line_is_named(tmp_path):
    log, _ = _log(tmp_path)
    with open(log, "ab") as f:
        f.write(b'{"ts": "2026-12-03T')  # the write a crash interrupted
    assert len(list(read(log))) == 3
    text = log.read_text().splitlines()
    bad = dict(json.loads(text[1]), p_defective=1.5)
    log.write_text("\n".join([text[0], json.dumps(bad), text[2]]) + "\n")
    with pytest.raises(LogError, match=r"p\.jsonl:2: p_defective 1\.5 is not a probability"):
        list(read(log))
    log.write_text(text[0] + "\nnot json\n")
    with pytest.raises(LogError, match=r"p\.jsonl:2: not a JSON line"):
        list(read(log))
    log.write_text(json.dumps({"verdict": "good"}) + "\n")
    with pytest.raises(LogError, match=r"p\.jsonl:1: a prediction line has exactly the fields"):
        list(read(log))


def test_image_statistics_and_the_embedding_are_checked_and_old_lines_still_read(tmp_path):
    img = tmp_path / "a.png"
    Image.new("L", (32, 32), 200).save(img)
    line = entry(img, REC, embedding=[0.1234567, -2.0])
    assert line["embedding"] == [0.12346, -2.0] and line["brightness"] == 200.0
    assert check(dict(line), "x") == line
    old = {k: v for k, v in line.items() if k in FIELDS}  # a log written before the statistics existed
    assert check(old, "x") == old
    for bad, msg in (({"brightness": 300.0}, "brightness 300.0 is not a grayscale statistic"),
                     ({"embedding": [1.0, float("nan")]}, "embedding is not a non-empty list of finite numbers"),
                     ({"embedding": []}, "embedding is not a non-empty list"),
                     ({"extra": 1}, "and optionally")):
        with pytest.raises(LogError, match=msg):
            check({**line, **bad}, "x")
