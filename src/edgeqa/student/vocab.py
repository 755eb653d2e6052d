"""The student's pruned vocabulary: the teacher tokenizer's ids that the domain uses, plus one `<pruned>` id.

The mapping (student id -> teacher id) is kept in the model config, and the teacher's tokenizer is saved beside
the weights, so student ids map back to the same text and the teacher's top-k targets map onto student ids
exactly (token-level KD). Embeddings start from a PCA of the teacher's embedding rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from edgeqa.errors import StageError
from edgeqa_runtime.schema import AnswerSchema


class PrunedTokenizer:
    """The teacher's tokenizer seen through the pruned vocabulary: student ids in, student ids out. Any teacher
    token outside the vocabulary becomes the `<pruned>` id (the last one), which decodes to nothing."""

    def __init__(self, base: Any, vocab_map: Sequence[int]):
        self.base = base
        self.keep = list(vocab_map)
        self.to_student = {t: s for s, t in enumerate(self.keep)}
        self.pruned_id = len(self.keep)

    @property
    def vocab_size(self) -> int:
        return len(self.keep) + 1

    def map_ids(self, teacher_ids: Iterable[int]) -> list[int]:
        return [self.to_student.get(int(t), self.pruned_id) for t in teacher_ids]

    def teacher_ids(self, student_ids: Iterable[int]) -> list[int]:
        return [self.keep[int(s)] for s in student_ids if int(s) != self.pruned_id]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.map_ids(self.base.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return str(self.base.decode(self.teacher_ids(ids), skip_special_tokens=skip_special_tokens))

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.to_student.get(int(self.base.convert_tokens_to_ids(token)), self.pruned_id)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return str(self.base.convert_tokens_to_string(tokens))

    def get_vocab(self) -> dict[str, int]:
        inv = self.base.convert_ids_to_tokens(self.keep)
        return {t: s for s, t in enumerate(inv)}


def build_vocab(base_tok: Any, texts: Iterable[str], extra_ids: Iterable[int], schema: AnswerSchema) -> list[int]:
    """Teacher ids the domain uses: the conversation layout, every closed option, the given texts (reference and
    teacher answers) and extra ids (teacher soft-target tokens). Sorted, so the mapping is deterministic."""
    from edgeqa.vlm.model import IM_START, Layout

    class _Identity:  # the base tokenizer, for Layout.build, without the newline scan over 49k tokens
        def __init__(self, t: Any):
            self.t = t

        def encode(self, s: str, add_special_tokens: bool = False) -> list[int]:
            return list(self.t.encode(s, add_special_tokens=add_special_tokens))

        def convert_tokens_to_ids(self, tok: str) -> int:
            return int(self.t.convert_tokens_to_ids(tok))

        def get_vocab(self) -> dict[str, int]:
            return {}

        def convert_tokens_to_string(self, toks: list[str]) -> str:
            return str(self.t.convert_tokens_to_string(toks))

    L = Layout.build(_Identity(base_tok), schema)
    ids: set[int] = set(L.pre) | set(L.post) | {L.end, int(base_tok.convert_tokens_to_ids(IM_START))}
    for v in L.field_ids.values():
        ids |= set(v)
    for opts in L.options.values():
        for o in opts:
            ids |= set(o)
    for t in texts:
        ids |= set(base_tok.encode(" " + t, add_special_tokens=False))
    ids |= {int(i) for i in extra_ids}
    nl = base_tok.encode("\n", add_special_tokens=False)
    ids |= set(nl)
    return sorted(ids)


def teacher_embedding_init(base_lm_dir: Path, vocab_map: Sequence[int], dim: int, seed: int) -> torch.Tensor:
    """Initial student embeddings: the teacher LM's embedding rows of the kept tokens, projected onto their top
    `dim` principal directions and scaled to std 0.02 (token similarities carried over; no download)."""
    from safetensors import safe_open

    f = Path(base_lm_dir) / "model.safetensors"
    if not f.is_file():
        raise StageError(f"{f} is missing: the student initialises its embeddings from the convert stage's LM")
    with safe_open(str(f), "pt") as st:
        key = next(k for k in st.keys() if k.endswith("embed_tokens.weight"))  # noqa: SIM118 (no __iter__)
        emb = st.get_slice(key)[:].float()
    rows = emb[torch.tensor(list(vocab_map))]
    rows = rows - rows.mean(0)
    _, _, v = torch.linalg.svd(rows, full_matrices=False)
    z = rows @ v[:dim].T
    if z.shape[1] < dim:  # fewer kept tokens than dimensions
        g = torch.Generator().manual_seed(seed)
        z = torch.cat([z, torch.randn(z.shape[0], dim - z.shape[1], generator=g) * z.std()], 1)
    z = z / z.std() * 0.02
    g = torch.Generator().manual_seed(seed)
    pruned = torch.randn(1, dim, generator=g) * 0.02
    return torch.cat([z, pruned])
