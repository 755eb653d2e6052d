"""The label stage's per-batch cache: an entry is reused only when it is this batch's answers from this teacher
and prompt; anything else is refused by name."""

import json

import pandas as pd
import pytest

from edgeqa.errors import StageError
from edgeqa.teacher.label import read_cache_entry

ROWS = pd.DataFrame({"sha256": ["a1", "b2"]})


def _write(tmp_path, recs):
    f = tmp_path / "0123.jsonl"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")
    return f


def _rec(sha, teacher="T1", ph="P1"):
    return {"sha256": sha, "teacher": teacher, "prompt_hash": ph, "verdict": "good"}


def test_a_matching_entry_is_reused_as_written(tmp_path):
    f = _write(tmp_path, [_rec("a1"), _rec("b2")])
    assert [json.loads(x)["sha256"] for x in read_cache_entry(f, ROWS, "T1", "P1")] == ["a1", "b2"]


@pytest.mark.parametrize("recs, why", [
    ([_rec("a1")], "1 records for a batch of 2"),
    ([_rec("a1"), "{not json"], "line 2 is not JSON"),
    ([_rec("b2"), _rec("a1")], "line 1 has sha256 'b2', expected 'a1'"),
    ([_rec("a1"), _rec("b2", teacher="T0")], "line 2 has teacher 'T0', expected 'T1'"),
    ([_rec("a1", ph="P0"), _rec("b2")], "line 1 has prompt_hash 'P0', expected 'P1'"),
    ([_rec("a1"), "[1, 2]"], "line 2 is not a label record"),
])
def test_a_corrupt_or_foreign_entry_is_refused_by_name(tmp_path, recs, why):
    f = _write(tmp_path, recs)
    with pytest.raises(StageError) as e:
        read_cache_entry(f, ROWS, "T1", "P1")
    assert str(f) in str(e.value) and why in str(e.value) and "delete" in str(e.value)
