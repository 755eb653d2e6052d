"""Draft tokens for speculative greedy decoding (prompt-lookup / n-gram drafting), from the training answers.

The reasons a teacher learns are written in a small, regular language ("crack defect: small, elongated and running
vertically, in the upper left region, ..."), so the next few tokens of a reason are usually the continuation of
the same words in some training answer. `NgramDrafter` guesses them from the longest matching suffix (up to `n`
tokens) of what the row holds so far. `Context.generate` then feeds the guesses through the LM in one pass and
keeps the prefix the LM itself would have chosen greedily. The drafts decide only how many tokens one pass can
confirm, never which tokens are generated.

On a 2-core CPU a decode step of the 135M LM costs about as much for one new token per row as for five: it
streams every weight once either way. Confirming several tokens per pass is where the speed comes from.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence


class NgramDrafter:
    """The most frequent continuation of each 1..n-gram in a corpus of token-id sequences."""

    def __init__(self, seqs: Sequence[Sequence[int]], n: int = 3):
        if n < 1:
            raise ValueError(f"NgramDrafter: n must be >= 1, got {n}")
        counts: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        for s in seqs:
            s = [int(t) for t in s]
            for i in range(1, len(s)):
                for k in range(1, n + 1):
                    if i - k < 0:
                        break
                    counts[tuple(s[i - k:i])][s[i]] += 1
        # ties go to the smaller token id, so the same corpus always drafts the same tokens
        self.next = {key: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for key, c in counts.items()}
        self.n = n

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        """Up to `k` guessed next tokens after `history`; fewer (or none) where no suffix of it was seen."""
        h = list(history)
        out: list[int] = []
        while len(out) < k:
            nxt = None
            for m in range(min(self.n, len(h)), 0, -1):
                nxt = self.next.get(tuple(h[-m:]))
                if nxt is not None:
                    break
            if nxt is None:
                break
            out.append(nxt)
            h.append(nxt)
        return out
