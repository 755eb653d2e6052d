"""The one interface every model that answers an inspection question implements: the local teacher, the `hf`
and `openai` teacher backends, the PyTorch student and the exported student in onnxruntime
(`edgeqa_runtime.session.OrtStudent`, which satisfies it structurally without importing edgeqa).

`predict_paths` answers image files in the answer schema and returns one record per image:

- `answer`: {verdict, defect_type, location, reason};
- `p_defective`: calibrated P(defective) (the answer's own score; an ensemble where the teacher has one);
- `p_defective_lm`: the language model alone, where the answer's score is an ensemble (else None);
- `type_probs`, `location_probs`: distributions over the closed sets (empty where the model has none);
- `soft_targets`: top-`top_k` token log-probs at the verdict and at each generated reason position;
- `generated_tokens`, `anomaly_score` (None where there is none), and `raw_error` (an answer that did not
  parse, for free-text backends).

`strict=True` is the retry after an answer that did not parse (a stricter prompt, or no stop before a few
reason tokens). An implementation honours every argument or refuses it by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from edgeqa_runtime.schema import AnswerSchema


@runtime_checkable
class Answerer(Protocol):
    fingerprint: str  # content hash of the model folder (keys caches, names the model in reports)

    def schema(self) -> AnswerSchema:
        """The closed sets this model answers in."""
        ...

    def predict_paths(self, paths: Sequence[str], max_reason_tokens: int, top_k: int = 1, strict: bool = False
                      ) -> list[dict[str, Any]]:
        """One answer record per image file, in order."""
        ...

    def parameters(self) -> int | None:
        """Parameters loaded at inference, or None where the weights are not here (a remote endpoint)."""
        ...

    def usage(self) -> dict[str, Any] | None:
        """Requests, tokens and cost for metered backends; None for models run here."""
        ...

