"""Knowledge distillation losses and targets (pure functions; no model, no I/O).

Token-level KD: at each answer position where the student's context is the teacher's own context, the loss is
T^2 * KL(teacher_T || student_T), where teacher_T is the teacher's top-k distribution softened by temperature T
and renormalised over the ids kept, and student_T = softmax(student logits / T) over the student's whole
(pruned) vocabulary. Positions without a target contribute nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
