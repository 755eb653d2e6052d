"""The local multimodal model: frozen EfficientNet-Lite0 features -> a trainable projector -> prefix
embeddings of a causal LM adapted with PEFT LoRA (LLaVA-style joining).

The language model decides. Verdict, type and location are chosen from the schema's closed sets by the LM's
own scores after the fixed answer prefix (edgeqa.vlm.scoring), in one left-to-right pass; only the reason is
generated. Training and scoring share one piecewise tokenisation of the answer (`Layout`), so the tokens
scored at inference are exactly the tokens trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from edgeqa.errors import StageError
from edgeqa.vlm.draft import NgramDrafter
from edgeqa.vlm.scoring import (
    OptionScores,
    first_token_scores,
    first_tokens_distinct,
    option_token_ids,
    positions,
    score_after,
    score_options,
)
from edgeqa_runtime.schema import FIELDS, PROMPT, Answer, AnswerSchema

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


class ProjectorConfig(PretrainedConfig):
    model_type = "edgeqa_projector"

    def __init__(self, in_dim: int = 2560, n_tokens: int = 16, lm_hidden: int = 576, hidden: int = 1024,
                 out_rms: float = 0.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.in_dim, self.n_tokens, self.lm_hidden, self.hidden = in_dim, n_tokens, lm_hidden, hidden
        self.out_rms = out_rms  # > 0: each image token is RMS-normalised to this (the LM's text embeddings' RMS)


class Projector(PreTrainedModel):
    """Image tokens (n_tokens, in_dim) -> LM prefix embeddings. Inputs are standardised per dimension with
    statistics fitted on the training images (without it the LM ignores the image)."""

    config_class = ProjectorConfig
    base_model_prefix = "projector"
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: ProjectorConfig):
        super().__init__(config)
        self.register_buffer("mean", torch.zeros(config.in_dim))
        self.register_buffer("std", torch.ones(config.in_dim))
        self.mlp = nn.Sequential(nn.Linear(config.in_dim, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, config.lm_hidden))
        self.pos = nn.Parameter(torch.zeros(config.n_tokens, config.lm_hidden))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def fit_standardiser(self, tokens: np.ndarray) -> None:
        flat = torch.from_numpy(tokens.reshape(-1, tokens.shape[-1]))
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(1e-4))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.mlp((tokens - self.mean) / self.std)
        if self.config.out_rms > 0:
            # Without this the teacher's projector grows its tokens to ~250x the text embeddings' norm.
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6) * self.config.out_rms
        return out + self.pos


@dataclass
class Layout:
    """Token ids of the fixed parts of the conversation and of each closed option."""

    pre: list[int]
    post: list[int]
    field_ids: dict[str, list[int]]
    options: dict[str, list[list[int]]]
    end: int
    schema: AnswerSchema
    stops: list[int]  # end of answer, and every token that contains a line break (the reason is one line)
    shared_prefix: bool = False  # `pre` holds the instruction: the LM reads it once per batch, not once per image

    @classmethod
    def build(cls, tokenizer: Any, schema: AnswerSchema, prompt: str = PROMPT, instruction_first: bool = False
              ) -> Layout:
        """The conversation: `pre`, the image tokens, `post`, then the answer. `instruction_first` puts the
        instruction in `pre` (before the image) instead of `post`: `pre` is then the same for every image and the
        LM reads it once per batch (`Context`), which is most of the prompt."""
        def enc(s: str) -> list[int]:
            return list(tokenizer.encode(s, add_special_tokens=False))

        end = int(tokenizer.convert_tokens_to_ids(IM_END))
        vocab = tokenizer.get_vocab()
        breaks = sorted(i for t, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([t]))
        pre, post = ((f"{IM_START}user\n{prompt}\n", f"{IM_END}\n{IM_START}assistant\n") if instruction_first
                     else (f"{IM_START}user\n", f"\n{prompt}{IM_END}\n{IM_START}assistant\n"))
        return cls(pre=enc(pre), post=enc(post),
                   field_ids={f: enc(AnswerSchema.prefix(f).rstrip()) for f in FIELDS},
                   options={f: option_token_ids(tokenizer, o) for f, o in schema.options().items()},
                   end=end, schema=schema, stops=[end, *[i for i in breaks if i != end]],
                   shared_prefix=instruction_first)

    def option(self, f: str, value: str | None) -> list[int]:
        opts = self.schema.options()[f]
        return self.options[f][opts.index(value or "none")]

    def answer_ids(self, a: Answer, tokenizer: Any, reason_ids: Sequence[int] | None = None
                   ) -> tuple[list[int], list[int]]:
        """(ids, key) for a whole answer; key marks the verdict/type/location value tokens. `reason_ids` gives the
        reason as already-tokenised ids (a teacher's generated tokens), instead of encoding `a.reason`."""
        ids: list[int] = []
        key: list[int] = []
        for f, v in (("verdict", a.verdict), ("type", a.defect_type), ("location", a.location)):
            ids += self.field_ids[f]
            key += [0] * len(self.field_ids[f])
            o = self.option(f, v)
            ids += o
            key += [1] * len(o)
        reason = (list(reason_ids) if reason_ids is not None
                  else list(tokenizer.encode(" " + a.reason, add_special_tokens=False))) + [self.end]
        ids += self.field_ids["reason"] + reason
        key += [0] * (len(self.field_ids["reason"]) + len(reason))
        return ids, key


@dataclass
class Prediction:
    answer: Answer
    p_defective: float  # calibrated
    p_defective_lm: float  # uncalibrated LM score
    type_probs: dict[str, float]
    location_probs: dict[str, float]
    soft_targets: list[dict[str, Any]] = field(default_factory=list)
    generated_tokens: int = 0


def shared_cache(lm: Any, shared: torch.Tensor, rows: int) -> Any:
    """The LM's KV cache of one prefix (length, hidden) that every row starts with, run once and copied to `rows`
    rows (with gradients when the caller has them on)."""
    ones = torch.ones(1, shared.shape[0], dtype=torch.long, device=shared.device)
    cache = lm(inputs_embeds=shared[None], attention_mask=ones, use_cache=True, logits_to_keep=1).cache
    cache.batch_repeat_interleave(rows)
    return cache


class Context:
    """A batch of images inside the LM, run once: the KV cache of [pre][image][post], grown by each row's tail.

    Every question after the prompt (verdict, type, location, then the reason) is a tail of token ids. `extend`
    appends the part of each row's tail that the row does not already hold: columns that match the tail's start
    are reused, the row's other columns are hidden (attention mask 0), and the new tokens take the positions
    right after the visible ones. So the image and the prompt, most of every context, run through the LM once
    per image instead of once per field, and the reason is generated from the same cache."""

    def __init__(self, lm: Any, pad_id: int, embeds: torch.Tensor, shared: torch.Tensor | None = None):
        """`embeds` (batch, length, hidden): every row's prompt. `shared` (length, hidden): a prefix that comes
        before every row's `embeds`; it runs through the LM once, and its cache is copied to every row."""
        self.lm, self.pad = lm, pad_id
        b, dev = embeds.shape[0], embeds.device
        n0 = 0 if shared is None else shared.shape[0]
        self.mask = torch.ones(b, n0 + embeds.shape[1], dtype=torch.long, device=dev)
        with torch.inference_mode():
            cache = shared_cache(lm, shared, b) if shared is not None and n0 else None
            out = lm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions(self.mask)[:, n0:],
                     cache=cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.rows: list[list[tuple[int, int]]] = [[] for _ in range(b)]  # per row: (column, token id) after the prompt
        self.spent = False  # a drafted `generate` dropped finished rows from the cache

    def extend(self, tails: Sequence[Sequence[int]], keep: int = 1) -> torch.Tensor:
        """Bring each row's context to [prompt][tails[i]]; returns the logits (batch, keep, vocab) at the last
        `keep` positions of the appended block (rows are left-padded inside it, so position -1 is every row's
        last token; keep > 1 is meaningful only when all tails add as many tokens)."""
        if self.spent:
            raise StageError("this Context's drafted generate dropped its finished rows; make a new Context "
                             "(VisionLM.context) to ask it anything more")
        new: list[list[int]] = []
        for i, t in enumerate(tails):
            have, k = self.rows[i], 0
            while k < min(len(have), len(t) - 1) and have[k][1] == t[k]:  # at least one new token: its logits
                k += 1
            for col, _ in have[k:]:
                self.mask[i, col] = 0
            self.rows[i] = have[:k]
            new.append(list(t[k:]))
        n, start, dev = max(len(x) for x in new), self.mask.shape[1], self.mask.device
        ids = torch.full((len(new), n), self.pad, dtype=torch.long, device=dev)
        seg = torch.zeros(len(new), n, dtype=torch.long, device=dev)
        for i, x in enumerate(new):
            ids[i, n - len(x):] = torch.tensor(x, dtype=torch.long, device=dev)
            seg[i, n - len(x):] = 1
            self.rows[i] += [(start + n - len(x) + j, tok) for j, tok in enumerate(x)]
        self.mask = torch.cat([self.mask, seg], 1)
        with torch.inference_mode():
            out = self.lm(input_ids=ids, attention_mask=self.mask, position_ids=positions(self.mask)[:, -n:],
                          cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.cache = out.cache
        return out.logits

    def score(self, tails: Sequence[Sequence[int]], option_ids: Sequence[Sequence[int]]) -> OptionScores:
        """The closed options' scores after each row's tail (edgeqa.vlm.scoring.score_after)."""
        last = self.extend(tails)[:, -1, :]
        return score_after(self.lm, last, self.cache, self.mask, option_ids)

    def generate(self, tails: Sequence[Sequence[int]], max_new: int, min_new: int, stops: Sequence[int],
                 drafter: NgramDrafter | None = None, draft_tokens: int = 0
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy decoding after each row's tail: (tokens (batch, steps), the scores at each step). A stop token
        ends a row (it is kept; later columns are padding); stops are forbidden before `min_new` tokens. The
        scores are those the choice was made from (stops masked), as `generate(output_scores=True)` gives.
        With a `drafter` and `draft_tokens` > 0, each pass through the LM checks up to that many drafted tokens
        per row (`_generate_drafted`): the same greedy tokens and scores in fewer passes."""
        if drafter is not None and draft_tokens > 0 and max_new > 0:
            return self._generate_drafted(tails, max_new, min_new, stops, drafter, draft_tokens)
        b = len(tails)
        stop_t = torch.tensor(list(stops), dtype=torch.long, device=self.mask.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.mask.device)
        toks: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        if max_new <= 0:
            return torch.zeros(b, 0, dtype=torch.long), scores
        logits = self.extend(tails)[:, -1, :]
        with torch.inference_mode():
            for step in range(max_new):
                s = logits.float()
                if step < min_new:
                    s[:, stop_t] = float("-inf")
                scores.append(s)
                nxt = torch.where(done, torch.full_like(done, self.pad, dtype=torch.long), s.argmax(-1))
                toks.append(nxt)
                done |= torch.isin(nxt, stop_t)
                if bool(done.all()) or step + 1 == max_new:
                    break
                self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], 1)
                out = self.lm(input_ids=nxt[:, None], attention_mask=self.mask,
                              position_ids=positions(self.mask)[:, -1:], cache=self.cache, use_cache=True)
                self.cache, logits = out.cache, out.logits[:, -1, :]
        return torch.stack(toks, 1), scores

    def _generate_drafted(self, tails: Sequence[Sequence[int]], max_new: int, min_new: int, stops: Sequence[int],
                          drafter: NgramDrafter, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Speculative greedy decoding with drafted tokens (edgeqa.vlm.draft). Each pass feeds every unfinished
        row its last chosen token and up to `k` drafts after it. The logits at each fed token give the greedy
        choice of the next one. A row keeps its drafts while they equal those choices, takes the choice after the
        last kept token as its next token, and hides the rejected drafts' columns (attention mask 0), so later
        tokens neither see them nor count them as positions. What is generated is exactly what the greedy loop
        generates, up to the float rounding of a multi-token pass. Rows that have finished leave the batch (their
        cache rows are dropped), so a pass costs only the rows still talking; the context is then spent, and
        `extend` refuses it."""
        b, dev = len(tails), self.mask.device
        stop_set = set(int(t) for t in stops)
        stop_t = torch.tensor(sorted(stop_set), dtype=torch.long, device=dev)
        gen: list[list[int]] = [[] for _ in range(b)]
        sc: list[list[torch.Tensor]] = [[] for _ in range(b)]
        done = [False] * b
        act = list(range(b))  # the rows in the cache, in its order
        with torch.inference_mode():
            last = self.extend(tails)[:, -1, :].float()
            pending = [last[i] for i in range(b)]  # each row's logits for its next token

            def take(i: int, logits: torch.Tensor) -> int:
                s = logits.float().clone()
                if len(gen[i]) < min_new:
                    s[stop_t] = float("-inf")
                t = int(s.argmax())
                gen[i].append(t)
                sc[i].append(s)
                if t in stop_set or len(gen[i]) >= max_new:
                    done[i] = True
                return t

            while True:
                fed: list[list[int]] = [[] for _ in range(b)]
                for i in range(b):
                    if not done[i]:
                        t = take(i, pending[i])
                        if not done[i]:
                            room = max_new - len(gen[i])
                            fed[i] = [t, *drafter.draft([*tails[i], *gen[i]], min(k, room))]
                if all(done):
                    break
                live = [i for i in act if fed[i]]
                if len(live) < len(act):  # finished rows leave the batch
                    where = {i: r for r, i in enumerate(act)}
                    sel = torch.tensor([where[i] for i in live], dtype=torch.long, device=dev)
                    self.cache.batch_select_indices(sel)
                    self.mask = self.mask[sel]
                    act, self.spent = live, True
                m = max(len(fed[i]) for i in act)
                ids = torch.full((len(act), m), self.pad, dtype=torch.long, device=dev)
                seg = torch.zeros(len(act), m, dtype=torch.long, device=dev)
                for r, i in enumerate(act):
                    ids[r, m - len(fed[i]):] = torch.tensor(fed[i], dtype=torch.long, device=dev)
                    seg[r, m - len(fed[i]):] = 1
                start = self.mask.shape[1]
                self.mask = torch.cat([self.mask, seg], 1)
                out = self.lm(input_ids=ids, attention_mask=self.mask, position_ids=positions(self.mask)[:, -m:],
                              cache=self.cache, use_cache=True, logits_to_keep=m)
                self.cache = out.cache
                logits = out.logits
                for r, i in enumerate(act):
                    f = fed[i]
                    c0 = m - len(f)
                    kept = 0  # drafts kept
                    for j in range(1, len(f)):
                        if done[i] or take(i, logits[r, c0 + j - 1]) != f[j]:
                            if not done[i]:  # the choice differed from the draft: it is the row's next token,
                                gen[i].pop()  # taken again from `pending` by the next pass
                                sc[i].pop()
                            break
                        kept += 1
                    pending[i] = logits[r, c0 + kept]
                    for j in range(kept + 1, len(f)):  # the rejected drafts' columns
                        self.mask[r, start + c0 + j] = 0
        steps = max(len(g) for g in gen)
        toks = torch.full((b, steps), self.pad, dtype=torch.long)
        vocab = sc[0][0].shape[-1]
        scores = [torch.zeros(b, vocab) for _ in range(steps)]
        for i in range(b):
            toks[i, :len(gen[i])] = torch.tensor(gen[i], dtype=torch.long)
            for j, s in enumerate(sc[i]):
                scores[j][i] = s
        return toks, scores


class VisionLM:
    """Projector + LM (+ tokenizer, layout). The backbone features are computed outside (edgeqa.vlm.vision)."""

    def __init__(self, lm: Any, tokenizer: Any, projector: Projector, layout: Layout,
                 verdict_temperature: float = 1.0, type_temperature: float = 1.0):
        self.lm, self.tok, self.projector, self.layout = lm, tokenizer, projector, layout
        self.verdict_temperature, self.type_temperature = verdict_temperature, type_temperature
        # speculative decoding of the reason (edgeqa.vlm.draft): off unless the owner sets both
        self.drafter: NgramDrafter | None = None
        self.draft_tokens = 0

    # ------------------------------------------------------------------------------------- inputs
    def _embed(self, ids: Sequence[int]) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()
        return emb(torch.tensor(list(ids), dtype=torch.long, device=emb.weight.device))

    def contexts(self, image_embeds: torch.Tensor, tails: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded [pre][image][post][tail_i] embeddings and attention mask, one row per image."""
        empty = image_embeds.new_zeros(0, image_embeds.shape[-1])
        rows = [torch.cat([self._embed(self.layout.pre), image_embeds[i], self._embed(self.layout.post),
                           self._embed(tails[i]) if len(tails[i]) else empty]) for i in range(len(tails))]
        n = max(r.shape[0] for r in rows)
        h = rows[0].shape[1]
        embeds = image_embeds.new_zeros(len(rows), n, h)
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=image_embeds.device)
        for i, r in enumerate(rows):
            embeds[i, n - r.shape[0]:] = r
            mask[i, n - r.shape[0]:] = 1
        return embeds, mask

    def context(self, tokens: torch.Tensor | None = None, img: torch.Tensor | None = None) -> Context:
        """The batch's prompt run once through the LM (`Context`), from image tokens or projected embeddings.
        With a `shared_prefix` layout, `pre` (the same for every image) runs once for the whole batch."""
        if tokens is None and img is None:
            raise ValueError("VisionLM.context needs image tokens or projected image embeddings (img)")
        with torch.inference_mode():
            img = self.projector(tokens) if img is None else img
            b = img.shape[0]
            pre, post = self._embed(self.layout.pre), self._embed(self.layout.post)
            if self.layout.shared_prefix:
                return Context(self.lm, self.layout.end, torch.cat([img, post.expand(b, -1, -1)], 1), shared=pre)
            e = torch.cat([pre.expand(b, -1, -1), img, post.expand(b, -1, -1)], 1)
        return Context(self.lm, self.layout.end, e)

    def loss(self, tokens: torch.Tensor, answers: Sequence[Answer], key_weight: float) -> torch.Tensor:
        """Weighted next-token cross-entropy on the answer tokens; verdict/type/location values x key_weight."""
        logits, tgt, w, _ = self.answer_logits(tokens, [self.layout.answer_ids(a, self.tok) for a in answers],
                                               key_weight)
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                         reduction="none").view_as(w)
        return (ce * w).sum() / w.sum()

    def answer_logits(self, tokens: torch.Tensor, seqs: Sequence[tuple[list[int], list[int]]], key_weight: float,
                      row_weights: Sequence[float] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Teacher-forced pass over [pre][image][post][answer ids]: (logits predicting each next token, targets
        (-100 outside the answer), per-token CE weights, prefix length). The logit at column prefix + j - 1
        predicts answer token j. With a `shared_prefix` layout, `pre` runs through the LM once for the batch (its
        cache, with gradients, is copied to every row) and the columns returned start after it."""
        img = self.projector(tokens)
        share = len(self.layout.pre) if self.layout.shared_prefix else 0
        prefix = len(self.layout.pre) + img.shape[1] + len(self.layout.post)
        n = prefix + max(len(s) for s, _ in seqs)
        h = img.shape[-1]
        embeds = img.new_zeros(len(seqs), n, h)
        dev = img.device
        mask = torch.zeros(len(seqs), n, dtype=torch.long, device=dev)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long, device=dev)
        weights = torch.zeros(len(seqs), n, device=dev)
        pre, post = self._embed(self.layout.pre), self._embed(self.layout.post)
        for i, (ids, key) in enumerate(seqs):
            row = torch.cat([pre, img[i], post, self._embed(ids)])
            embeds[i, :row.shape[0]] = row
            mask[i, :row.shape[0]] = 1
            labels[i, prefix:prefix + len(ids)] = torch.tensor(ids, device=dev)
            rw = 1.0 if row_weights is None else float(row_weights[i])
            weights[i, prefix:prefix + len(ids)] = torch.tensor([rw * (key_weight if k else 1.0) for k in key],
                                                                device=dev)
        if not share:
            logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits[:, :-1].float()
            return logits, labels[:, 1:], weights[:, 1:], prefix
        cache = shared_cache(self.lm, pre, len(seqs))
        logits = self.lm(inputs_embeds=embeds[:, share:], attention_mask=mask, cache=cache, use_cache=True,
                         position_ids=positions(mask)[:, share:]).logits[:, :-1].float()
        return logits, labels[:, share + 1:], weights[:, share + 1:], prefix - share

    # ------------------------------------------------------------------------------------ scoring
    def verdict_logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """LM logit of 'defective' vs 'good' after `verdict:` (first-token scores), and the raw scores."""
        with torch.inference_mode():
            img = self.projector(tokens)
            e, m = self.contexts(img, [self.layout.field_ids["verdict"]] * len(tokens))
            s = score_options(self.lm, e, m, self.layout.options["verdict"])
        return s.logprobs[:, 1] - s.logprobs[:, 0], s

    def type_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log P(type | defective) over the dataset's types (uncalibrated)."""
        types = self.layout.schema.types
        if not types:
            return torch.zeros(len(tokens), 0)
        L = self.layout
        tail = L.field_ids["verdict"] + L.option("verdict", "defective") + L.field_ids["type"]
        with torch.inference_mode():
            e, m = self.contexts(self.projector(tokens), [tail] * len(tokens))
            return score_options(self.lm, e, m, self.layout.options["type"][:len(types)]).logprobs

    def verdict_and_type(self, tokens: torch.Tensor, ctx: Context | None = None
                         ) -> tuple[tuple[torch.Tensor, Any], torch.Tensor]:
        """`verdict_logits` and `type_logprobs` from the batch's `Context` (made here if not given): the type
        context ("... verdict: defective; type:") extends the verdict context and every row has the same length,
        so with first-token options both are read from ONE pass over that tail. Otherwise each is scored on the
        same cache (the type's tail reuses the verdict's columns)."""
        ctx = ctx if ctx is not None else self.context(tokens)
        types = self.layout.schema.types
        L = self.layout
        tail0 = L.field_ids["verdict"]
        tail1 = tail0 + L.option("verdict", "defective") + L.field_ids["type"]
        topts, vopts = L.options["type"][:len(types)], L.options["verdict"]
        n = len(ctx.rows)
        if types and first_tokens_distinct(topts) and first_tokens_distinct(vopts):
            logits = ctx.extend([tail1] * n, keep=len(tail1) - len(tail0) + 1)
            vs = first_token_scores(logits[:, 0, :], vopts)
            ts = first_token_scores(logits[:, -1, :], topts).logprobs
        else:
            vs = ctx.score([tail0] * n, vopts)
            ts = ctx.score([tail1] * n, topts).logprobs if types else torch.zeros(n, 0)
        return (vs.logprobs[:, 1] - vs.logprobs[:, 0], vs), ts

    def location_logprobs(self, img: torch.Tensor | None, type_pick: Sequence[str | None],
                          bias: torch.Tensor | None = None, ctx: Context | None = None) -> torch.Tensor:
        """log P(location | defective, type) over the location options (the grid words, then 'none'), from the
        projected image tokens `img` (or the batch's `Context`) and each image's chosen type; `bias` (N, number
        of grid words) is added to the grid words' scores and the whole renormalised."""
        L = self.layout
        tails = [L.field_ids["verdict"] + L.option("verdict", "defective") + L.field_ids["type"]
                 + L.option("type", t) + L.field_ids["location"] for t in type_pick]
        ctx = ctx if ctx is not None else self.context(img=img)
        lp = ctx.score(tails, L.options["location"]).logprobs
        if bias is not None:
            k = bias.shape[1]
            lp = torch.cat([lp[:, :k] + bias.to(lp.dtype), lp[:, k:]], 1).log_softmax(-1)
        return lp

    def predict(self, tokens: torch.Tensor, max_reason_tokens: int, top_k: int,
                p_defective: Sequence[float] | None = None,
                verdict: tuple[torch.Tensor, Any] | None = None, min_reason_tokens: int = 0,
                type_lp: torch.Tensor | None = None, location_bias: torch.Tensor | None = None,
                type_bias: torch.Tensor | None = None, ctx: Context | None = None) -> list[Prediction]:
        """Answer for a batch of images. `p_defective` (e.g. an ensemble with anomaly evidence) may override the
        LM's calibrated P(defective) for the verdict; the LM's own score is kept beside it. `verdict` passes
        the result of `verdict_logits(tokens)` when the caller already has it. `min_reason_tokens` forbids
        stopping before that many reason tokens (the stricter retry of an empty reason). `location_bias` (N, number of
        locations) is added to the LM's location log-probabilities before the choice (the anomaly map's evidence);
        the reason is then generated after the chosen location, so it describes it. `type_bias` (N, number of
        types) is added to the calibrated type log-probabilities the same way (the defect-patch kNN's votes).
        Every field and the reason are asked of one `Context` (`ctx`, the one `verdict_and_type` used, or a new
        one): the prompt and the image run through the LM once."""
        L, schema = self.layout, self.layout.schema
        ctx = ctx if ctx is not None else self.context(tokens)
        if verdict is None or type_lp is None:
            v2, t2 = self.verdict_and_type(tokens, ctx)
            verdict, type_lp = verdict if verdict is not None else v2, type_lp if type_lp is not None else t2
        d, vs = verdict
        p_lm = torch.sigmoid(d / self.verdict_temperature)
        p = torch.tensor(list(p_defective)) if p_defective is not None else p_lm
        n = len(tokens)
        types = schema.types
        soft: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for i in range(n):
            soft[i].append(_topk("verdict", vs.vocab_logprobs[i], top_k))
        if types:
            z = type_lp / self.type_temperature
            type_p = torch.softmax(z + type_bias.to(z.dtype) if type_bias is not None else z, -1)
            type_pick = [types[j] for j in type_p.argmax(-1).tolist()]
        else:
            type_p, type_pick = torch.zeros(n, 0), [None] * n
        verdicts = ["defective" if float(p[i]) >= 0.5 else "good" for i in range(n)]
        loc_probs: list[dict[str, float]] = [{} for _ in range(n)]
        locs: list[str | None] = [None] * n
        if schema.locations:
            lp = self.location_logprobs(None, type_pick, location_bias, ctx=ctx)
            opts = schema.options()["location"]
            for i in range(n):
                loc_probs[i] = {o: round(float(v), 6) for o, v in zip(opts, lp[i].exp())}
                locs[i] = schema.locations[int(lp[i, :len(schema.locations)].argmax())]
        answers_prefix = []
        for i in range(n):
            good = verdicts[i] == "good"
            t = None if good else type_pick[i]
            loc = None if good else locs[i]
            answers_prefix.append((verdicts[i], t, loc))
        tails = [L.field_ids["verdict"] + L.option("verdict", v) + L.field_ids["type"] + L.option("type", t)
                 + L.field_ids["location"] + L.option("location", loc) + L.field_ids["reason"]
                 for v, t, loc in answers_prefix]
        seqs, step_scores = ctx.generate(tails, max_reason_tokens, min_reason_tokens, L.stops, self.drafter,
                                         self.draft_tokens)
        stop_set = set(L.stops)
        preds = []
        for i in range(n):
            ids = seqs[i].tolist()
            stop = next((k for k, t in enumerate(ids) if t in stop_set), len(ids))
            gen = ids[:stop]
            for step in range(len(gen)):
                soft[i].append(_topk(f"reason:{step}", torch.log_softmax(step_scores[step][i], -1), top_k))
            reason = self.tok.decode(gen, skip_special_tokens=True).strip()
            v, t, loc = answers_prefix[i]
            preds.append(Prediction(
                answer=Answer(v, t, loc, reason), p_defective=round(float(p[i]), 6),
                p_defective_lm=round(float(p_lm[i]), 6),
                type_probs={ty: round(float(x), 6) for ty, x in zip(types, type_p[i])},
                location_probs=loc_probs[i], soft_targets=soft[i], generated_tokens=len(gen)))
        return preds


def _topk(position: str, logprobs: torch.Tensor, k: int) -> dict[str, Any]:
    v, i = logprobs.topk(k)
    return {"position": position, "ids": i.tolist(), "logprobs": [round(float(x), 5) for x in v]}


def fit_temperature(logits: np.ndarray, targets: np.ndarray, binary: bool) -> float:
    """Temperature minimising NLL on held-out data (grid search over log-spaced values; robust, no optimiser).
    Held-out data that cannot support the fit (no rows; one class only, for the verdict) is refused with the
    counts, rather than fitted to a meaningless or NaN temperature."""
    n_pos = int(np.sum(targets)) if binary else len(targets)
    if len(targets) == 0 or (binary and n_pos in (0, len(targets))):
        raise StageError(f"fitting a {'verdict' if binary else 'type'} temperature on val: {len(targets)} images, "
                         f"{n_pos} defective; it needs defective and good images in val (raise ingest.splits.val, "
                         "or validate.min_per_class_split so validation refuses such a split first)")
    best_t, best = 1.0, float("inf")
    for t in np.exp(np.linspace(np.log(0.05), np.log(20.0), 121)):
        if binary:
            z = logits / t
            nll = float(np.mean(np.logaddexp(0, -z) * targets + np.logaddexp(0, z) * (1 - targets)))
        else:
            z = logits / t
            z = z - z.max(1, keepdims=True)
            lp = z - np.log(np.exp(z).sum(1, keepdims=True))
            nll = float(-lp[np.arange(len(targets)), targets].mean())
        if nll < best:
            best_t, best = float(t), nll
    return best_t
