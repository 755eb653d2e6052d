"""Throw-away answer heads on the image embeddings: linear verdict, type and location classifiers that read the
mean and the max over the projected image tokens. Used in training only, never saved or exported:

- the teacher's "align before you talk" phase (`edgeqa.teacher.sft.align_projector`) trains the projector with
  them before the LM is adapted;
- every student stage adds their loss to the answer loss (`student.aux_weight`), so the image embeddings carry
  the answer linearly from the first steps, where a decoder trained from scratch otherwise learned the text and
  ignored the image for whole runs (val AUROC stuck near 0.5-0.7 while the val loss fell).

The mean is what a decoder's still-uniform attention delivers at the start of training; the max keeps a small
defect that lights one token (magnetic-tile val, teacher heads: AUROC 0.62 on the mean, 0.92 on the max).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgeqa_runtime.schema import Answer, AnswerSchema

FIELDS = ("verdict", "defect_type", "location")


class AnswerHeads(nn.Module):
    """Linear heads over cat(mean, max) of image embeddings (batch, tokens, dim): verdict (2 classes), and the
    schema's types and locations where it has any and `fields` names them. Created in that order (the seeded
    initialisation depends on it)."""

    def __init__(self, dim: int, schema: AnswerSchema, fields: Sequence[str] = FIELDS):
        super().__init__()
        unknown = set(fields) - set(FIELDS)
        if unknown or "verdict" not in fields:
            raise ValueError(f"answer heads: fields {list(fields)}; allowed: verdict (always), defect_type, location")
        self.types, self.locations = list(schema.types), list(schema.locations)
        self.heads = nn.ModuleDict({"verdict": nn.Linear(2 * dim, 2)})
        for name, classes in (("defect_type", self.types), ("location", self.locations)):
            if classes and name in fields:
                self.heads[name] = nn.Linear(2 * dim, len(classes))

    def targets(self, answers: Sequence[Answer]) -> dict[str, torch.Tensor]:
        """Class indices per head; -100 where the answer has no such field (a good image's type)."""
        y = {"verdict": torch.tensor([int(a.verdict == "defective") for a in answers], dtype=torch.int64)}
        for name, classes, vals in (("defect_type", self.types, [a.defect_type for a in answers]),
                                    ("location", self.locations, [a.location for a in answers])):
            if name in self.heads:
                y[name] = torch.tensor([classes.index(v) if v in classes else -100 for v in vals], dtype=torch.int64)
        return y

    def loss(self, embeds: torch.Tensor, y: dict[str, torch.Tensor], weights: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Sum over heads of the (example-weighted) cross-entropy; a head with no target in the batch is left out."""
        z = torch.cat([embeds.mean(1), embeds.amax(1)], -1)
        parts = []
        for name, head in self.heads.items():
            t = y[name].to(z.device)
            valid = t != -100
            if not valid.any():
                continue
            if weights is None:
                parts.append(F.cross_entropy(head(z), t, ignore_index=-100))
                continue
            ce = F.cross_entropy(head(z[valid]), t[valid], reduction="none")
            w = weights.to(z.device)[valid]
            parts.append((ce * w).sum() / w.sum().clamp_min(1e-12))
        return torch.stack(parts).sum() if parts else embeds.sum() * 0.0
