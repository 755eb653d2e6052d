"""Constrained scoring: a causal LM's own distribution over a closed set of options, given a context.

This is how the teacher and the student choose verdict, type and location: no free generation, no string
matching. When the options' first tokens are distinct, the log-probability of the first token decides
(one forward pass over the context); otherwise each option's whole token sequence is scored. Scores are
normalised over the options, so `exp(logprobs)` is a distribution (e.g. P(defective)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["auto", "first_token", "sequence"]


def option_token_ids(tokenizer: Any, options: Sequence[str], lead: str = " ") -> list[list[int]]:
    """Token ids of each option as it appears after the schema's `field: ` prefix (leading space)."""
    ids = [tokenizer.encode(lead + o, add_special_tokens=False) for o in options]
    for o, t in zip(options, ids):
        if not t:
            raise ValueError(f"option {o!r} encodes to no tokens")
    return ids


def first_tokens_distinct(ids: Sequence[Sequence[int]]) -> bool:
    firsts = [t[0] for t in ids]
    return len(set(firsts)) == len(firsts)


@dataclass
class OptionScores:
    logprobs: Any  # torch.Tensor (batch, n_options), log-softmax over the options
    method: str
    vocab_logprobs: Any = None  # (batch, vocab) at the decision position (first_token method), for soft targets

    def probs(self) -> Any:
        return self.logprobs.exp()

    def argmax(self) -> list[int]:
        return self.logprobs.argmax(dim=-1).tolist()


def first_token_scores(logits: Any, option_ids: Sequence[Sequence[int]]) -> OptionScores:
    """Options scored by their first token from the logits (batch, vocab) at the decision position: log p of
    each first token, renormalised over the options; the whole vocabulary's log-probs kept for soft targets."""
    import torch

    if not first_tokens_distinct(option_ids):
        raise ValueError("first_token scoring needs options whose first tokens are distinct")
    vocab = torch.log_softmax(logits.float(), dim=-1)
    first = torch.tensor([t[0] for t in option_ids], device=logits.device)
    return OptionScores(torch.log_softmax(vocab[:, first], dim=-1), "first_token", vocab)


def positions(mask: Any) -> Any:
    """Position ids from an attention mask: each row counts its visible columns, so left padding and hidden
    columns (mask 0) take no position."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def score_options(model: Any, inputs_embeds: Any, attention_mask: Any, option_ids: Sequence[Sequence[int]],
                  method: Method = "auto") -> OptionScores:
    """Score options after a batch of contexts given as embeddings (batch, length, hidden), left-padded.

    first_token: log p(first token | context), restricted to the options and renormalised.
    sequence: sum of log p(option tokens | context), renormalised over the options.
    """
    import torch

    if method == "auto":
        method = "first_token" if first_tokens_distinct(option_ids) else "sequence"
    if method not in ("first_token", "sequence"):
        raise ValueError(f"unknown scoring method {method!r}; allowed: auto, first_token, sequence")
    with torch.inference_mode():
        out = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=positions(attention_mask), use_cache=method == "sequence", logits_to_keep=1)
        return score_after(model, out.logits[:, -1, :], out.cache, attention_mask, option_ids, method)


def score_after(model: Any, last_logits: Any, cache: Any, attention_mask: Any, option_ids: Sequence[Sequence[int]],
                method: Method = "auto") -> OptionScores:
    """Score options after contexts that already ran: `last_logits` (batch, vocab) at each context's last
    position, and, for the sequence method, the contexts' KV `cache` and `attention_mask` (left padding and
    hidden columns allowed; the cache is copied, never changed)."""
    import torch

    if method == "auto":
        method = "first_token" if first_tokens_distinct(option_ids) else "sequence"
    with torch.inference_mode():
        if method == "first_token":
            return first_token_scores(last_logits, option_ids)
        elif method == "sequence":
            # Options share continuations: every distinct "option minus its last token" (" upper" for " upper
            # left" and " upper right") runs once, all those of one length in one batch on a copy of the
            # context's KV cache repeated per continuation.
            import copy

            first_lp = torch.log_softmax(last_logits.float(), dim=-1)
            b = last_logits.shape[0]
            heads = sorted({tuple(ids[:-1]) for ids in option_ids if len(ids) > 1})
            step_lp: dict[tuple[int, ...], Any] = {}  # head -> (batch, len(head), vocab) log-probs
            for n in sorted({len(h) for h in heads}):
                group = [h for h in heads if len(h) == n]
                k = len(group)
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(k)  # rows: image 0 x k heads, image 1 x k heads, ...
                rest = torch.tensor(group, device=last_logits.device).repeat(b, 1)
                m = torch.cat([attention_mask.repeat_interleave(k, 0), attention_mask.new_ones(b * k, n)], 1)
                step = model(input_ids=rest, attention_mask=m, position_ids=positions(m)[:, -n:],
                             cache=c, use_cache=True)
                lp = torch.log_softmax(step.logits.float(), dim=-1).view(b, k, n, -1)
                for j, h in enumerate(group):
                    step_lp[h] = lp[:, j]
            cols = []
            for ids in option_ids:
                total = first_lp[:, ids[0]]
                if len(ids) > 1:
                    lp = step_lp[tuple(ids[:-1])]
                    nxt = torch.tensor(ids[1:], device=lp.device).view(1, -1, 1).expand(b, -1, 1)
                    total = total + lp.gather(-1, nxt).squeeze(-1).sum(-1)
                cols.append(total)
            scores = torch.stack(cols, dim=-1)
        else:
            raise ValueError(f"unknown scoring method {method!r}; allowed: auto, first_token, sequence")
    return OptionScores(torch.log_softmax(scores, dim=-1), method)
