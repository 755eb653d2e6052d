"""The saved local teacher: how it is stored and loaded, its anomaly evidence and its calibrated ensemble.

A teacher folder holds `projector/` and `adapter/` (save_pretrained), `teacher.json` (base LM folder, image
size, grid, schema, temperatures, the verdict ensemble, the anomaly evidence's weights in the type and location
choices) and, with anomaly evidence, `anomaly_bank.safetensors` (patch features of good training images; with
type evidence, the labelled defect patches and their types). The base LM is the `convert` output, loaded,
never copied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeqa.answerer import Answerer
from edgeqa.errors import StageError
from edgeqa.io import folder_fingerprint
from edgeqa_runtime.schema import AnswerSchema

VISION_FILE = "vision.safetensors"  # the tuned Lite0 blocks and head of a teacher trained with vision_tune_from
DRAFTS_FILE = "drafts.json"  # the training answers' token ids, which the reason's drafts are looked up in
DRAFT_ORDER = 3  # the longest n-gram a draft continues


@dataclass
class TeacherMeta:
    base_lm_dir: str
    image_size: int
    grid: int
    types: list[str]
    locations: list[str]
    verdict_temperature: float
    type_temperature: float
    anomaly: bool
    ensemble: dict[str, float]  # w_lm * lm_z + w_anomaly * anomaly_z + bias (z: standardised on val; fit_ensemble)
    anomaly_mean: float
    anomaly_std: float
    token_blocks: list[int] = field(default_factory=list)  # folders from before token blocks pooled none
    lm_mean: float = 0.0  # the calibrated LM logit's mean and sd on val: the ensemble reads it standardised
    lm_std: float = 1.0   # (folders from before: 0 and 1, the raw calibrated logit)
    vision_tuned_from: int | None = None  # Lite0 blocks from here (and the head) are in vision.safetensors
    location_anomaly_weight: float = 0.0  # the anomaly map's weight in the location choice, fitted on val (0: LM alone)
    type_anomaly_weight: float = 0.0  # the defect-patch kNN's weight in the type choice, fitted on val (0: LM alone)
    type_top_patches: int = 3  # the image's most anomalous patches that vote for a type
    type_neighbours: int = 5   # the nearest labelled defect patches each of them asks
    vision_head: dict[str, int] | None = None  # the supervised vision head's shape (grid, hidden, n_types); None: none
    head_mean: float = 0.0  # the head's verdict logit, standardised on val for the ensemble (as lm_mean / lm_std)
    head_std: float = 1.0
    type_head_weight: float = 0.0  # the head's type log-probabilities' weight in the type choice, fitted on val
    draft_tokens: int = 0  # speculative decoding of the reason from DRAFTS_FILE (0: one token a pass; older folders)
    instruction_first: bool = False  # the prompt's layout it was trained with (Layout.build; older folders: False)

    def schema(self) -> AnswerSchema:
        return AnswerSchema(types=tuple(self.types), locations=tuple(self.locations))


def anomaly_maps(patches: np.ndarray, bank: np.ndarray, rows: int = 2048) -> np.ndarray:
    """Per image and patch (N, P): the distance to the nearest good-training patch, the anomaly map.

    The squared distance |q|^2 + |b|^2 - 2 q.b is one matrix product per `rows` query patches, and only its
    row minimum takes a square root: the arithmetic `torch.cdist` uses for matrices this size, without its
    full (queries x bank) matrix of roots (1.7x faster on 16 images against 39200 bank patches, AVX2)."""
    import torch

    if patches.ndim != 3 or len(patches) == 0:
        return np.zeros((len(patches), patches.shape[1] if patches.ndim > 1 else 0), np.float32)
    b = torch.from_numpy(bank)
    bn = (b * b).sum(1)
    q = torch.from_numpy(np.ascontiguousarray(patches, dtype=np.float32)).reshape(-1, patches.shape[-1])
    out = torch.empty(len(q))
    with torch.inference_mode():
        for i in range(0, len(q), rows):
            x = q[i:i + rows]
            d2 = torch.addmm(bn, x, b.T, alpha=-2).amin(1) + (x * x).sum(1)
            out[i:i + rows] = d2.clamp_min(0).sqrt()
    return out.view(patches.shape[0], patches.shape[1]).numpy()


def anomaly_scores(patches: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Per image: the largest distance from any of its patches to the nearest good-training patch."""
    m = anomaly_maps(patches, bank)
    return m.max(axis=1) if len(m) else np.zeros(0, np.float32)


def cell_evidence(maps: np.ndarray) -> np.ndarray:
    """(N, 9): the anomaly map's maximum in each cell of the 3x3 location grid, in GRID_WORDS order. The patch
    grid is square (the teacher resizes to a square); a patch belongs to the cell of its centre, the same rule
    that turns a mask's centroid into its location word (edgeqa.data.maskfacts.grid_word)."""
    n, p = maps.shape
    side = int(round(p ** 0.5))
    if side * side != p or side < 3:
        raise StageError(f"anomaly map of {p} patches: expected a square grid of at least 3x3 patches")
    idx = (np.arange(side) + 0.5) * 3 // side  # the grid row (and column) of each patch row (column) centre
    cell = (3 * idx[:, None] + idx[None, :]).reshape(-1).astype(int)
    out = np.full((n, 9), -np.inf, np.float32)
    for k in range(9):
        out[:, k] = maps[:, cell == k].max(axis=1)
    return out


def mask_cells(mask_path: str | Path, side: int) -> np.ndarray:
    """(side * side,) bool: the patches of a side x side grid that the mask touches (the image resized to a
    square, as the teacher sees it)."""
    from PIL import Image

    with Image.open(mask_path) as im:
        mk = np.asarray(im.convert("L").resize((side * 8, side * 8), Image.Resampling.NEAREST)) > 127
    return mk.reshape(side, 8, side, 8).any(axis=(1, 3)).reshape(-1)


def type_evidence(maps: np.ndarray, patches: np.ndarray, type_bank: np.ndarray, type_of: np.ndarray,
                  n_types: int, top: int = 3, neighbours: int = 5) -> np.ndarray:
    """(N, n_types): log of the smoothed vote shares for each defect type. The image's `top` most anomalous
    patches (its anomaly map) each ask their `neighbours` nearest patches among the labelled defect patches
    (patches under a mask, with that image's type) and vote for those patches' types."""
    import torch

    tb = torch.from_numpy(type_bank)
    k = min(neighbours, len(type_bank))
    out = np.zeros((len(maps), n_types), np.float64)
    for i in range(len(maps)):
        q = torch.from_numpy(patches[i][np.argsort(-maps[i])[:top]])
        near = torch.cdist(q, tb).topk(k, largest=False).indices.reshape(-1).numpy()
        out[i] = np.bincount(type_of[near], minlength=n_types)[:n_types]
    return np.log((out + 0.5) / (out.sum(1, keepdims=True) + 0.5 * n_types))


def location_evidence(cells: np.ndarray, anomaly_std: float) -> np.ndarray:
    """The anomaly map's evidence for each location word (N, 9): the cell maxima, centred per image, in units of
    the val spread of the image anomaly score. The weight is fitted on exactly this (teacher_sft)."""
    return (cells - cells.mean(axis=1, keepdims=True)) / anomaly_std


def location_bias(meta: TeacherMeta, cells: np.ndarray) -> np.ndarray:
    """`location_evidence` times the weight fitted on val: what predict adds to the LM's location scores."""
    return meta.location_anomaly_weight * location_evidence(cells, meta.anomaly_std)


def ensemble_p(meta: TeacherMeta, lm_logit: np.ndarray, anomaly: np.ndarray | None,
               head: np.ndarray | None = None) -> np.ndarray:
    """Calibrated P(defective): the LM alone (temperature), or the ensemble fitted on val when the teacher has
    anomaly evidence or a vision head. A part the teacher was fitted with must be given."""
    z = lm_logit / meta.verdict_temperature
    use_anomaly, use_head = meta.anomaly, meta.vision_head is not None
    if not use_anomaly and not use_head:
        return 1 / (1 + np.exp(-z))
    if (use_anomaly and anomaly is None) or (use_head and head is None):
        raise StageError("ensemble_p: the teacher's verdict ensemble needs "
                         + " and ".join(n for n, u, v in (("the anomaly scores", use_anomaly, anomaly),
                                                          ("the vision head's logits", use_head, head))
                                        if u and v is None))
    e = meta.ensemble
    s = e["w_lm"] * (z - meta.lm_mean) / meta.lm_std + e["bias"]
    if use_anomaly and anomaly is not None:
        s = s + e["w_anomaly"] * (anomaly - meta.anomaly_mean) / meta.anomaly_std
    if use_head and head is not None:
        s = s + e.get("w_head", 0.0) * (head - meta.head_mean) / meta.head_std
    return 1 / (1 + np.exp(-s))


def load_drafter(path: Path, vocab_size: int) -> Any:
    """The `NgramDrafter` of a teacher folder's DRAFTS_FILE; a missing, corrupt or foreign file is refused by name."""
    from edgeqa.vlm.draft import NgramDrafter

    if not path.is_file():
        raise StageError(f"{path}: missing; teacher.json asks for drafted decoding (draft_tokens > 0), whose "
                         "n-grams this file holds. Rerun teacher_sft")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"{path}: not readable JSON ({e}); rerun teacher_sft") from e
    seqs = d.get("sequences") if isinstance(d, dict) else None
    n = d.get("n") if isinstance(d, dict) else None
    if not isinstance(n, int) or n < 1 or not isinstance(seqs, list) or not all(
            isinstance(s, list) and all(isinstance(t, int) and 0 <= t < vocab_size for t in s) for s in seqs):
        raise StageError(f"{path}: not a drafts file; it must hold {{'n': int >= 1, 'sequences': lists of token "
                         f"ids in [0, {vocab_size})}}. Rerun teacher_sft")
    return NgramDrafter(seqs, n)


def load_tuned_vision(path: Path, backbone: Any) -> dict[str, Any]:
    """The tuned backbone tensors of a teacher folder, checked against the backbone they go into: a missing
    file, a foreign key or a wrong shape is refused by name rather than half-loaded."""
    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise StageError(f"{path} is missing: this teacher was trained with tuned vision; rerun teacher_sft")
    state = load_file(str(path))
    own = backbone.state_dict()
    for k, v in state.items():
        if k not in own:
            raise StageError(f"{path}: tensor {k!r} is not a parameter of EfficientNet-Lite0")
        if tuple(v.shape) != tuple(own[k].shape):
            raise StageError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, Lite0 has {tuple(own[k].shape)}")
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}


def teacher_backbone(folder: Path, tuned_from: int | None) -> Any:
    """The local teacher's Lite0: ImageNet weights, with the folder's tuned blocks loaded when it has them (its
    anomaly bank was built from those features, so every reader of the bank needs them too)."""
    from edgeqa.vlm.vision import load_lite0

    backbone = load_lite0()
    if tuned_from is not None:
        backbone.load_state_dict(load_tuned_vision(Path(folder) / VISION_FILE, backbone), strict=False)
    return backbone.eval()


class LocalTeacher:
    def __init__(self, folder: Path, threads: int = 2):
        import torch
        from peft import PeftModel
        from safetensors.numpy import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edgeqa.vlm.model import Layout, Projector, VisionLM

        folder = Path(folder)
        meta_file = folder / "teacher.json"
        if not meta_file.is_file():
            raise StageError(f"{folder} is not a teacher folder (no teacher.json); run the teacher_sft stage")
        torch.set_num_threads(threads)
        self.meta = TeacherMeta(**json.loads(meta_file.read_text()))
        self.folder = folder
        tok = AutoTokenizer.from_pretrained(self.meta.base_lm_dir)
        lm = AutoModelForCausalLM.from_pretrained(self.meta.base_lm_dir)
        lm = PeftModel.from_pretrained(lm, folder / "adapter").merge_and_unload().eval()  # LoRA folded in
        projector = Projector.from_pretrained(folder / "projector").eval()
        self.model = VisionLM(lm, tok, projector,
                              Layout.build(tok, self.meta.schema(), instruction_first=self.meta.instruction_first),
                              self.meta.verdict_temperature, self.meta.type_temperature)
        if self.meta.draft_tokens:
            self.model.drafter = load_drafter(folder / DRAFTS_FILE, lm.config.vocab_size)
            self.model.draft_tokens = self.meta.draft_tokens
        self.backbone = teacher_backbone(folder, self.meta.vision_tuned_from)
        self.head = None
        if self.meta.vision_head is not None:
            from edgeqa.teacher.vision_head import HEAD_FILE, load_head

            self.head = load_head(folder / HEAD_FILE, self.backbone, self.meta.vision_head)
        banks = load_file(str(folder / "anomaly_bank.safetensors")) if self.meta.anomaly else {}
        self.bank = banks.get("bank")
        self.type_bank, self.type_of = banks.get("type_bank"), banks.get("type_of")
        if self.meta.type_anomaly_weight and (self.type_bank is None or self.type_of is None):
            raise StageError(f"{folder}: teacher.json weights type evidence but anomaly_bank.safetensors holds no "
                             "type_bank/type_of; rerun teacher_sft")
        self.fingerprint = folder_fingerprint(folder)  # keys the label cache

    def schema(self) -> AnswerSchema:
        return self.meta.schema()

    def parameters(self) -> int:
        """Every parameter loaded at inference: LM (embeddings included, LoRA merged), projector, vision backbone."""
        parts = [self.model.lm, self.model.projector, self.backbone, *([self.head] if self.head is not None else [])]
        return sum(p.numel() for m in parts for p in m.parameters())

    def usage(self) -> None:
        return None

    def predict_paths(self, paths: Sequence[str], max_reason_tokens: int, top_k: int = 1, strict: bool = False
                      ) -> list[dict[str, Any]]:
        """Answers for image files. The closed fields are forced, so the only way an answer can fail to parse
        is an empty reason; `strict` (the retry) then forbids stopping before a few reason tokens."""
        import torch

        from edgeqa.teacher.vision_head import START, head_scores
        from edgeqa.vlm.vision import image_features

        f = image_features(self.backbone, paths, self.meta.image_size, self.meta.grid,
                           token_blocks=self.meta.token_blocks, keep=[START - 1] if self.head is not None else [])
        head_v = head_t = None
        if self.head is not None:
            head_v, head_t = head_scores(self.head, torch.from_numpy(f[f"block{START - 1}"]))
        tokens = torch.from_numpy(f["tokens"])
        ctx = self.model.context(tokens)  # the prompt and image run once; every field and the reason reuse it
        verdict, type_lp = self.model.verdict_and_type(tokens, ctx)
        maps = anomaly_maps(f["patches"], self.bank) if self.bank is not None else None
        anomaly = maps.max(axis=1) if maps is not None else None
        p = ensemble_p(self.meta, verdict[0].numpy(), anomaly, head_v)
        bias = tbias = None
        if maps is not None and self.meta.location_anomaly_weight and self.meta.locations:
            bias = torch.from_numpy(location_bias(self.meta, cell_evidence(maps)))
        if maps is not None and self.meta.type_anomaly_weight and self.type_bank is not None \
                and self.type_of is not None:
            ev = type_evidence(maps, f["patches"], self.type_bank, self.type_of, len(self.meta.types),
                               self.meta.type_top_patches, self.meta.type_neighbours)
            tbias = torch.from_numpy(self.meta.type_anomaly_weight * ev).float()
        if head_t is not None and self.meta.type_head_weight and self.meta.types:
            hb = torch.from_numpy(self.meta.type_head_weight * head_t).float()
            tbias = hb if tbias is None else tbias + hb
        preds = self.model.predict(tokens, max_reason_tokens, top_k, p_defective=p.tolist(), verdict=verdict,
                                   min_reason_tokens=min(3, max_reason_tokens) if strict else 0, type_lp=type_lp,
                                   location_bias=bias, type_bias=tbias, ctx=ctx)
        out = []
        for i, pr in enumerate(preds):
            rec = asdict(pr)
            rec["answer"] = asdict(pr.answer)
            rec["anomaly_score"] = None if anomaly is None else round(float(anomaly[i]), 6)
            out.append(rec)
        return out


def load_teacher(folder: Path, threads: int = 2) -> Answerer:
    """The teacher a folder describes (the `teacher_sft` output): the local one, or an hf / openai backend."""
    meta_file = Path(folder) / "teacher.json"
    if not meta_file.is_file():
        raise StageError(f"{folder} is not a teacher folder (no teacher.json); run the teacher_sft stage")
    d = json.loads(meta_file.read_text())
    backend = d.get("backend", "local")
    if backend == "local":
        return LocalTeacher(folder, threads)
    from edgeqa.teacher.backends import HFTeacher, OpenAITeacher, RemoteMeta

    meta = RemoteMeta(**d)
    if backend == "hf":
        return HFTeacher(meta, threads)
    if backend == "openai":
        return OpenAITeacher(meta)
    raise StageError(f"{meta_file}: unknown backend {backend!r} (known: local, hf, openai)")
