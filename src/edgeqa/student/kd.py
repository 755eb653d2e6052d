"""The distillation loss, as one object, and its targets (no model, no I/O).

`DistillLoss(alpha, temperature)` is the loss of every student stage:

    (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)

CE is the token-weighted cross-entropy on the answer tokens (verdict/type/location values up-weighted, each row
weighted by its source). The KD term applies at each answer position where the student's context is the
teacher's own context: teacher_T is the teacher's top-k distribution softened by temperature T and
renormalised over the ids kept, student_T = softmax(student logits / T) over the student's whole (pruned)
vocabulary. Positions without a target contribute nothing. With alpha 0 (baseline, sft) it is plain CE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# One KD target: (index of the answer token it predicts, student ids, teacher log-probs of those ids).
Target = tuple[int, list[int], list[float]]


def kd_kl(student_logits: torch.Tensor, target_ids: torch.Tensor, target_logp: torch.Tensor,
          temperature: float) -> torch.Tensor:
    """Per-row T^2 * KL(teacher_T || student_T).

    student_logits (N, V); target_ids (N, K) student ids; target_logp (N, K) teacher log-probs (unnormalised
    over the K kept ids; -inf marks padding). Returns (N,)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = torch.softmax(target_logp / temperature, dim=-1)
    log_t = torch.log_softmax(target_logp / temperature, dim=-1)
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, target_ids)
    terms = torch.where(t > 0, t * (log_t - log_s), torch.zeros_like(t))
    return terms.sum(-1) * temperature ** 2


def kd_loss(logits: torch.Tensor, mask: torch.Tensor, target_ids: torch.Tensor, target_logp: torch.Tensor,
            temperature: float, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KD term over the masked positions of a batch.

    logits (B, L, V); mask (B, L) bool, True where a target exists; target_ids/target_logp (B, L, K)."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    kl = kd_kl(logits[mask], target_ids[mask], target_logp[mask], temperature)
    if row_weights is None:
        return kl.mean()
    w = row_weights.unsqueeze(1).expand_as(mask)[mask]
    return (kl * w).sum() / w.sum().clamp_min(1e-12)


@dataclass
class Restricted:
    ids: list[int]       # student ids
    logprobs: list[float]
    dropped: float       # teacher probability mass (of the top-k) on ids outside the student's vocabulary


def restrict(teacher_ids: Sequence[int], logprobs: Sequence[float], to_student: dict[int, int]) -> Restricted:
    """Top-k teacher targets restricted to the student's vocabulary (renormalisation happens in `kd_kl`)."""
    ids, lps, dropped = [], [], 0.0
    for t, lp in zip(teacher_ids, logprobs):
        s = to_student.get(int(t))
        if s is None:
            dropped += math.exp(lp)
        else:
            ids.append(s)
            lps.append(float(lp))
    return Restricted(ids, lps, dropped)


def option_targets(probs: dict[str, float], options: Sequence[str], option_ids: Sequence[Sequence[int]]
                   ) -> tuple[list[int], list[float]]:
    """A teacher distribution over closed options as first-token targets: options sharing a first token pool
    their mass (" upper" for "upper left" and "upper right")."""
    mass: dict[int, float] = {}
    for o, ids in zip(options, option_ids):
        mass[ids[0]] = mass.get(ids[0], 0.0) + float(probs.get(o, 0.0))
    keep = {k: v for k, v in mass.items() if v > 0}
    return list(keep), [math.log(v) for v in keep.values()]


@dataclass(frozen=True)
class DistillLoss:
    """(1 - alpha) * weighted CE + alpha * T^2 * KL(teacher_T || student_T). Defaults: plain CE."""

    alpha: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @staticmethod
    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor) -> torch.Tensor:
        """Token-weighted CE: logits (B, L, V), targets (B, L) with -100 outside the answer, weights (B, L)."""
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100, reduction="none").view_as(token_weights)
        return (ce * token_weights).sum() / token_weights.sum().clamp_min(1e-12)

    @staticmethod
    def place(targets: Sequence[Sequence[Target]], shape: tuple[int, int], prefix: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row targets at logit column prefix + j - 1 (the column predicting answer token j): (ids, log-probs
        padded with -inf, mask), each (B, L, K) or (B, L)."""
        b, length = shape
        k = max((len(ids) for row in targets for _, ids, _ in row), default=1)
        ids = torch.zeros(b, length, k, dtype=torch.long)
        lps = torch.full((b, length, k), float("-inf"))
        mask = torch.zeros(b, length, dtype=torch.bool)
        for i, row in enumerate(targets):
            for j, tid, tlp in row:
                c = prefix + j - 1
                ids[i, c, :len(tid)] = torch.tensor(tid)
                lps[i, c, :len(tlp)] = torch.tensor(tlp)
                mask[i, c] = True
        return ids, lps, mask

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor, prefix: int,
                 kd_targets: Sequence[Sequence[Target]] | None = None, row_weights: Sequence[float] | None = None
                 ) -> torch.Tensor:
        ce = self.cross_entropy(logits, targets, token_weights)
        if self.alpha == 0.0 or kd_targets is None:
            return ce
        ids, lps, mask = (t.to(logits.device) for t in self.place(kd_targets, (logits.shape[0], logits.shape[1]),
                                                                   prefix))
        rw = (None if row_weights is None
              else torch.tensor(list(row_weights), dtype=torch.float32, device=logits.device))
        return (1 - self.alpha) * ce + self.alpha * kd_loss(logits, mask, ids, lps, self.temperature, rw)


def kd_targets(layout: Any, tok: Any, answer: Any, rec: dict[str, Any], own_sequence: bool, top_k: int
               ) -> tuple[list[Target], dict[str, int], list[float]]:
    """KD targets of one example from the teacher's label record `rec`: the targets; how many of each kind
    (verdict, type, location, reason); and the teacher mass dropped by the vocabulary at each reason position.

    - verdict: the teacher's calibrated P(defective) (its decision, the ensemble where it has one);
    - type: the teacher's type distribution, when the answer's verdict is defective (the teacher scored types in
      that same context);
    - location: the teacher's location distribution (options sharing a first token pooled), when the answer's
      type is the teacher's own pick;
    - reason (`own_sequence`: the answer is the teacher's own): its top-k tokens at each generated position,
      restricted to the student's vocabulary.
    """
    schema = layout.schema
    opts = schema.options()
    out: list[Target] = []
    kinds = {"verdict": 1, "type": 0, "location": 0, "reason": 0}
    j = len(layout.field_ids["verdict"])
    p = min(max(float(rec["p_defective"]), 1e-6), 1 - 1e-6)
    out.append((j, *option_targets({"good": 1 - p, "defective": p}, opts["verdict"], layout.options["verdict"])))
    if answer.verdict == "defective":
        j += len(layout.option("verdict", "defective")) + len(layout.field_ids["type"])
        tp = rec.get("type_probs") or {}
        if schema.types and tp:
            out.append((j, *option_targets(tp, schema.types, layout.options["type"][:len(schema.types)])))
            kinds["type"] = 1
        teacher_type = max(tp, key=lambda k: tp[k]) if tp else None
        j += len(layout.option("type", answer.defect_type)) + len(layout.field_ids["location"])
        lp = rec.get("location_probs") or {}
        if schema.locations and lp and (not schema.types or answer.defect_type == teacher_type):
            out.append((j, *option_targets(lp, opts["location"], layout.options["location"])))
            kinds["location"] = 1
    dropped: list[float] = []
    if own_sequence:
        j0 = _reason_start(layout, answer)
        steps = [s for s in rec.get("soft_targets", []) if s["position"].startswith("reason:")]
        for k, st in enumerate(steps):
            r = restrict(st["ids"][:top_k], st["logprobs"][:top_k], tok.to_student)
            dropped.append(r.dropped)
            if r.ids:
                out.append((j0 + k, r.ids, r.logprobs))
                kinds["reason"] += 1
    return out, kinds, dropped


def _reason_start(layout: Any, a: Any) -> int:
    return (len(layout.field_ids["verdict"]) + len(layout.option("verdict", a.verdict))
            + len(layout.field_ids["type"]) + len(layout.option("type", a.defect_type))
            + len(layout.field_ids["location"]) + len(layout.option("location", a.location))
            + len(layout.field_ids["reason"]))
