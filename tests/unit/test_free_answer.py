"""Mapping a zero-shot model's free answer into the schema (backends hf and openai)."""

from edgeqa.teacher.backends import instructions, map_free_answer
from edgeqa_runtime.schema import AnswerSchema

S = AnswerSchema.for_dataset(["crack", "hole", "oil_stain"], has_masks=True)


def test_the_strict_form_is_taken_as_is():
    a, why = map_free_answer("verdict: defective; type: hole; location: top; reason: a round pit", S)
    assert why is None and (a.verdict, a.defect_type, a.location, a.reason) == ("defective", "hole", "top",
                                                                                 "a round pit")


def test_free_text_is_mapped_by_its_words():
    a, why = map_free_answer("The product is defective: there is a crack in the upper left corner.", S)
    assert why is None and (a.verdict, a.defect_type, a.location) == ("defective", "crack", "upper left")
    a, _ = map_free_answer("An oil stain near the center.", S)
    assert (a.verdict, a.defect_type, a.location) == ("defective", "oil_stain", "center")
    a, _ = map_free_answer("No defects: the surface is intact and good.", S)
    assert (a.verdict, a.defect_type, a.location) == ("good", None, None)
    a, _ = map_free_answer("It is not defective.", S)
    assert a.verdict == "good"


def test_unreadable_answers_are_failures_with_a_reason_not_guesses():
    a, why = map_free_answer("curedievesvetblueprovoking ending", S)
    assert a is None and "no verdict" in why
    a, why = map_free_answer("It is defective, damaged somewhere.", S)
    assert a is None and "names none of the types" in why


def test_instructions_list_the_closed_sets_and_the_strict_version_adds_the_form():
    text = instructions(S, strict=False)
    assert "crack, hole, oil_stain, none" in text and "upper left" in text
    assert "exactly one line" in instructions(S, strict=True) and "exactly one line" not in text
