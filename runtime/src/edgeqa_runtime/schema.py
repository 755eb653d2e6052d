"""The answer schema shared by the teacher, the student and the evaluation: one textual form, one strict parser.

    verdict: defective; type: crack; location: upper left; reason: a thin dark line runs across the surface

Verdict, type and location come from closed sets (`none` where a field does not apply, or where the dataset
cannot have it); the reason is free text and comes last, so it may contain any character but a newline.
Models we run ourselves choose the closed fields by their own scores over `AnswerSchema.options()` and
generate only the reason. An answer that does not parse raises `AnswerParseError` with the text and the
reason it was refused: callers count and report it, never guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# The 3x3 location words, from a defect's mask centroid (row by row, left to right).
GRID_WORDS = (
    "upper left",
    "top",
    "upper right",
    "left",
    "center",
    "right",
    "lower left",
    "bottom",
    "lower right",
)
PROMPT = "You are a product quality engineer, justify the quality of the product and provide the reason."
# Asked once more when an answer does not parse (free-text backends; the local teacher forces the form).
STRICT_PROMPT = ("Answer in exactly one line of this form and nothing else: 'verdict: good|defective; type: <one of "
                 "the listed types, or none>; location: <one of the listed locations, or none>; reason: <a short "
                 "plain sentence>'.")
VERDICTS = ("good", "defective")
NONE = "none"
FIELDS = ("verdict", "type", "location", "reason")
_PATTERN = re.compile(r"^verdict: (?P<verdict>[^;\n]*); type: (?P<type>[^;\n]*); location: (?P<location>[^;\n]*); "
                      r"reason: (?P<reason>[^\n]*)$")


class AnswerParseError(ValueError):
    def __init__(self, text: str, why: str):
        super().__init__(f"{why}: {text!r}")
        self.text = text
        self.why = why


@dataclass(frozen=True)
class Answer:
    verdict: str
    defect_type: str | None
    location: str | None
    reason: str


@dataclass(frozen=True)
class AnswerSchema:
    """The closed sets of one dataset: its defect types (empty: no types) and locations (empty: no masks)."""

    types: tuple[str, ...]
    locations: tuple[str, ...] = GRID_WORDS

    @classmethod
    def for_dataset(cls, defect_types: Sequence[str] | None, has_masks: bool) -> AnswerSchema:
        types = tuple(defect_types or ())
        for t in types:
            if not t or t == NONE or any(c in t for c in ";\n"):
                raise ValueError(f"defect type {t!r} cannot be used in an answer (empty, 'none', ';' or newline)")
        return cls(types=types, locations=GRID_WORDS if has_masks else ())

    def options(self) -> dict[str, tuple[str, ...]]:
        """The closed set of each constrained field, in answer order."""
        return {"verdict": VERDICTS, "type": (*self.types, NONE), "location": (*self.locations, NONE)}

    @staticmethod
    def prefix(field: str) -> str:
        """The fixed text that precedes a field's value in the answer."""
        if field not in FIELDS:
            raise KeyError(field)
        return f"{field}: " if field == "verdict" else f"; {field}: "

    def format(self, a: Answer) -> str:
        self.check(a)
        return (f"verdict: {a.verdict}; type: {a.defect_type or NONE}; location: {a.location or NONE}; "
                f"reason: {a.reason}")

    def check(self, a: Answer, text: str | None = None) -> Answer:
        shown = text if text is not None else repr(a)
        opts = self.options()
        if a.verdict not in VERDICTS:
            raise AnswerParseError(shown, f"verdict {a.verdict!r} is not one of {list(VERDICTS)}")
        if (a.defect_type or NONE) not in opts["type"]:
            raise AnswerParseError(shown, f"type {a.defect_type!r} is not one of {list(opts['type'])}")
        if (a.location or NONE) not in opts["location"]:
            raise AnswerParseError(shown, f"location {a.location!r} is not one of {list(opts['location'])}")
        if a.verdict == "good" and (a.defect_type or a.location):
            raise AnswerParseError(shown, "a good verdict must have type none and location none")
        if a.verdict == "defective" and self.types and not a.defect_type:
            raise AnswerParseError(shown, "a defective verdict needs a defect type")
        if not a.reason.strip() or "\n" in a.reason:
            raise AnswerParseError(shown, "the reason must be one non-empty line")
        return a

    def parse(self, text: str) -> Answer:
        """Strictly parse one answer; surrounding whitespace is the only slack allowed."""
        m = _PATTERN.match(text.strip())
        if m is None:
            raise AnswerParseError(text, "not of the form 'verdict: ...; type: ...; location: ...; reason: ...'")
        t, loc = m["type"].strip(), m["location"].strip()
        a = Answer(verdict=m["verdict"].strip(), defect_type=None if t == NONE else t,
                   location=None if loc == NONE else loc, reason=m["reason"].strip())
        return self.check(a, text)

