import pandas as pd
import pytest

from edgeqa.config import GRID_WORDS
from edgeqa.data.manifest import reference_answer
from edgeqa_runtime.schema import PROMPT, Answer, AnswerParseError, AnswerSchema

SCHEMA = AnswerSchema.for_dataset(["crack", "scratch", "broken_large"], has_masks=True)


@pytest.mark.parametrize("a", [
    Answer("defective", "crack", "upper left", "a thin dark line runs across the surface"),
    Answer("defective", "broken_large", None, "broken_large defect: visible; note the chipped rim"),
    Answer("good", None, None, "no defect is visible: the surface is even and intact"),
])
def test_format_parse_round_trip(a):
    text = SCHEMA.format(a)
    assert SCHEMA.parse(text) == a
    assert SCHEMA.parse(f"  {text}\n") == a


def test_the_documented_form():
    a = SCHEMA.parse("verdict: defective; type: crack; location: upper left; reason: a thin dark line runs across")
    assert (a.verdict, a.defect_type, a.location) == ("defective", "crack", "upper left")
    assert "quality engineer" in PROMPT


@pytest.mark.parametrize(("text", "why"), [
    ("defective, a crack", "not of the form"),
    ("verdict: defective; location: top; type: crack; reason: x", "not of the form"),
    ("verdict: broken; type: crack; location: top; reason: x", "verdict 'broken'"),
    ("verdict: defective; type: dent; location: top; reason: x", "type 'dent'"),
    ("verdict: defective; type: crack; location: middle; reason: x", "location 'middle'"),
    ("verdict: good; type: crack; location: none; reason: x", "good verdict must have type none"),
    ("verdict: defective; type: none; location: top; reason: x", "needs a defect type"),
    ("verdict: defective; type: crack; location: top; reason:  ", "not of the form"),
    ("verdict: defective; type: crack; location: top; reason: x\nmore", "not of the form"),
    ("Sure! verdict: good; type: none; location: none; reason: fine", "not of the form"),
])
def test_strict_parser_refuses_and_says_why(text, why):
    with pytest.raises(AnswerParseError) as ei:
        SCHEMA.parse(text)
    assert why in ei.value.why and ei.value.text == text


def test_datasets_without_types_or_masks():
    s = AnswerSchema.for_dataset(None, has_masks=False)
    assert s.options() == {"verdict": ("good", "defective"), "type": ("none",), "location": ("none",)}
    a = s.parse("verdict: defective; type: none; location: none; reason: defect: visible on the surface")
    assert a.defect_type is None and a.location is None
    with pytest.raises(AnswerParseError, match="location 'top'"):
        s.parse("verdict: defective; type: none; location: top; reason: x")
    with pytest.raises(ValueError, match="cannot be used"):
        AnswerSchema.for_dataset(["a;b"], has_masks=True)


def test_options_and_prefixes_rebuild_the_answer():
    opts = SCHEMA.options()
    assert opts["location"] == (*GRID_WORDS, "none") and opts["type"][-1] == "none"
    text = "".join(SCHEMA.prefix(f) + v for f, v in
                   [("verdict", "defective"), ("type", "crack"), ("location", "top"), ("reason", "x")])
    assert SCHEMA.parse(text) == Answer("defective", "crack", "top", "x")


def test_reference_answer_from_manifest_rows(tiny_manifest):
    df = pd.read_parquet(tiny_manifest)
    schema = AnswerSchema.for_dataset(sorted(df.defect_type.dropna().unique()), has_masks=True)
    for _, row in df.iterrows():
        a = reference_answer(row)
        assert schema.parse(schema.format(a)) == a
        assert (a.verdict == "good") == (a.defect_type is None)
