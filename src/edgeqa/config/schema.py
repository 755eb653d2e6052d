"""Typed params: `params.yaml` is loaded once into pydantic models, one per stage section.

Unknown keys and bad values are rejected with the key's dotted name and what is allowed.
Nothing happens at import time. With EDGEQA_TRACE_PARAMS=DIR set, every field a process reads is recorded
(see `edgeqa.config.trace`), so a test can check that each stage reads only the params dvc.yaml declares.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeqa.config import trace
from edgeqa_runtime.schema import GRID_WORDS

__all__ = ["GRID_WORDS", "SPLITS"]  # re-exported: the location words belong to the answer schema
SPLITS = ("labelled", "unlabelled", "val", "test")


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the dotted key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __getattribute__(self, name: str) -> Any:
        if trace.active() and not name.startswith("_") and name in type(self).model_fields:
            trace.read(self, name)
        return super().__getattribute__(name)

    def model_dump(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if trace.active():
            trace.read(self, None)  # the whole section is read
        return super().model_dump(*args, **kwargs)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _ordered_pair(v: tuple[float, float]) -> tuple[float, float]:
    if not v[0] < v[1]:
        raise ValueError(f"must be [low, high] with low < high, got {list(v)}")
    return v


class PathsConfig(_Section):
    """Every stage path. dvc.yaml templates its deps/outs from here, so code and DAG cannot drift."""

    synth_dir: str
    ingest_dir: str
    reports_dir: str
    bench_dir: str
    base_lm_dir: str
    models_dir: str  # each model the pipeline trains lives in <models_dir>/<name> (teacher, baseline, ...)
    labels_dir: str
    student_features_dir: str

    def model_dir(self, name: str) -> str:
        """The folder of model `name` (a name in evaluate.models, or teacher)."""
        return f"{self.models_dir}/{name}"


class SynthCategory(_Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["object", "texture"]
    defect_types: list[str] = Field(min_length=3)

    @field_validator("defect_types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        allowed = {"crack", "scratch", "contamination", "broken", "stain", "hole"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"unknown synthetic defect type(s) {bad}; allowed: {sorted(allowed)}")
        if len(set(v)) != len(v):
            raise ValueError("defect types must be unique")
        return v


class SynthConfig(_Section):
    seed: int = Field(ge=0)
    image_size: int = Field(ge=64, le=1024)
    categories: list[SynthCategory] = Field(min_length=1)
    good_per_category: int = Field(ge=4)
    defective_per_type: int = Field(ge=4)
    defect_scale: tuple[Fraction, Fraction]
    contrast: tuple[Fraction, Fraction]
    speck_rate: float = Field(ge=0.0, le=20.0)
    lighting_gradient: Fraction
    max_shift: Fraction
    noise_sigma: Fraction
    workers: int = Field(ge=1, le=64)

    @field_validator("defect_scale", "contrast")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(v)


class MaskFactsConfig(_Section):
    """Thresholds that turn a mask into words (size class, shape, polarity)."""

    size_classes: dict[str, Fraction] = Field(min_length=2)
    elongated_ratio: float = Field(gt=1.0)
    polarity_min_delta: float = Field(ge=0.0, le=255.0)

    @field_validator("size_classes")
    @classmethod
    def _increasing(cls, v: dict[str, float]) -> dict[str, float]:
        vals = list(v.values())
        if vals != sorted(vals) or len(set(vals)) != len(vals):
            raise ValueError("upper bounds must increase strictly, e.g. {tiny: 0.002, small: 0.01, large: 1.0}")
        if vals[-1] != 1.0:
            raise ValueError("the last size class must have upper bound 1.0 so every mask gets a class")
        return v


class IngestConfig(_Section):
    adapter: Literal["mvtec", "magnetic_tile", "folder"]
    root: str
    reviews: str | None = None  # edgeqa review batches, added to the labelled split (None: none)
    dataset: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    defect_types: list[str] | None = None
    good_class: str = "good"
    category: str | None = None
    mask_dir: str | None = None
    mask_suffix: str = ""
    image_exts: list[str] = Field(min_length=1)
    allowed_modes: list[str] = Field(min_length=1)
    min_side: int = Field(ge=8)
    max_side: int = Field(le=20000)
    splits: dict[str, Fraction]
    split_seed: str = ""
    empty_masks: Literal["error", "allow"]
    mask_facts: MaskFactsConfig

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != set(SPLITS):
            raise ValueError(f"must have exactly the keys {list(SPLITS)}, got {sorted(v)}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1.0, got {sum(v.values()):.4f}")
        return {k: v[k] for k in SPLITS}

    @field_validator("image_exts")
    @classmethod
    def _exts(cls, v: list[str]) -> list[str]:
        for e in v:
            if not e.startswith("."):
                raise ValueError(f"extensions start with a dot, like '.png'; got {e!r}")
        return [e.lower() for e in v]

    @model_validator(mode="after")
    def _sides(self) -> IngestConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self


class ValidateConfig(_Section):
    min_per_class_split: int = Field(ge=1)
    split_tolerance: Fraction
    max_failed_rows_shown: int = Field(ge=1, le=1000)


class BaseLMConfig(_Section):
    """The teacher's language model, as shipped in a Python package (offline)."""

    package: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    gguf_file: str = Field(pattern=r"\.gguf$")
    probe_text: str = Field(min_length=1)


class HFBackendConfig(_Section):
    """Backend `hf`: a local Hugging Face VLM folder (BLIP-2, or any AutoModelForImageTextToText), zero-shot."""

    path: str | None  # the model folder (save_pretrained layout); required when backend is hf
    max_new_tokens: int = Field(ge=1, le=512)


class OpenAIBackendConfig(_Section):
    """Backend `openai`: an OpenAI-compatible chat-completions endpoint."""

    base_url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")  # the NAME of the variable; the key never goes here
    timeout_s: float = Field(gt=0, le=600)
    max_retries: int = Field(ge=0, le=20)
    concurrency: int = Field(ge=1, le=64)
    structured_output: bool
    max_new_tokens: int = Field(ge=1, le=4096)
    price_in_per_mtok: float = Field(ge=0)  # USD per million prompt tokens, for cost accounting
    price_out_per_mtok: float = Field(ge=0)


class TeacherConfig(_Section):
    """The teacher. `local` (default): frozen Lite0 features -> projector -> SmolLM2 with LoRA, SFT on the
    labelled split. `hf` and `openai`: zero-shot backends (edgeqa.teacher.backends)."""

    backend: Literal["local", "hf", "openai"]
    hf: HFBackendConfig
    openai: OpenAIBackendConfig
    seed: int = Field(ge=0)
    image_size: int = Field(ge=64, le=1024)
    grid: int = Field(ge=1, le=8)
    token_blocks: list[int]
    projector_hidden: int = Field(ge=16)
    projector_norm: bool
    vision_tune_from: int | None = Field(ge=1, le=16)  # None: frozen Lite0; N: blocks N..15 and the head trained
    lr_vision: float = Field(gt=0, le=1)
    augment_flip: bool  # mirrored labelled images in training (left/right words swapped)
    lora_r: int = Field(ge=1, le=256)
    lora_alpha: int = Field(ge=1)
    lora_targets: list[str] = Field(min_length=1)
    epochs: int = Field(ge=1, le=100)
    batch_size: int = Field(ge=1, le=256)
    lr_projector: float = Field(gt=0, le=1)
    lr_lora: float = Field(gt=0, le=1)
    align_steps: int = Field(ge=0, le=100000)
    lr_align: float = Field(gt=0, le=1)
    key_token_weight: float = Field(ge=1.0, le=100.0)
    patience: int = Field(ge=1)
    anomaly: bool
    anomaly_location: bool = True  # the anomaly map's highest cell as location evidence (weight fitted on val)
    anomaly_type: bool = True  # the most anomalous patches' nearest labelled defect patches vote for a type
    max_reason_tokens: int = Field(ge=1, le=256)
    top_k: int = Field(ge=1, le=100)
    threads: int = Field(ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # where teacher_sft trains (labelling stays on the CPU)
    # the supervised vision head (edgeqa.teacher.vision_head): 0 steps = off
    vision_head_steps: int = Field(default=0, ge=0, le=100000)
    vision_head_lr: float = Field(default=0.002, gt=0, le=1)
    vision_head_lr_vision: float = Field(default=0.0005, gt=0, le=1)
    vision_head_grid: int = Field(default=7, ge=1, le=14)
    vision_head_hidden: int = Field(default=256, ge=8, le=4096)
    vision_head_members: int = Field(default=1, ge=1, le=16)  # heads from seeds seed..seed+n-1, averaged
    # speculative decoding of the reason: drafted tokens checked per LM pass (0: one token a pass); the same
    # greedy reason either way (edgeqa.vlm.draft)
    draft_tokens: int = Field(default=0, ge=0, le=32)
    # the instruction before the image: the prompt's shared part runs once per batch (Layout.build)
    instruction_first: bool = False

    @field_validator("token_blocks")
    @classmethod
    def _token_blocks(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 0 <= b <= 15]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"teacher.token_blocks {v}: distinct Lite0 block indices 0..15 (block 10 is the "
                             "stride-16, 112-channel map)")
        return v

    @model_validator(mode="after")
    def _hf_path(self) -> TeacherConfig:
        if self.backend == "hf" and not self.hf.path:
            raise ValueError("teacher.hf.path must name a Hugging Face VLM folder when teacher.backend is hf")
        if self.vision_head_steps and self.vision_tune_from is not None and self.vision_tune_from < 8:
            raise ValueError(f"teacher.vision_head_steps > 0 reads the ImageNet output of Lite0 block 7, but "
                             f"teacher.vision_tune_from {self.vision_tune_from} tunes it; use null or 8 and above")
        return self


class DecoderConfig(_Section):
    """The student's causal decoder: `llama` (nn.Linear blocks, prunable; the default) or `gpt2` (Conv1D)."""

    arch: Literal["llama", "gpt2"]
    hidden: int = Field(ge=16, le=4096)
    layers: int = Field(ge=1, le=48)
    heads: int = Field(ge=1, le=64)
    intermediate: int = Field(ge=16, le=16384)
    max_positions: int = Field(ge=64, le=4096)

    @model_validator(mode="after")
    def _heads(self) -> DecoderConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class LoraSettings(_Section):
    r: int = Field(ge=1, le=256)
    alpha: int = Field(ge=1)
    targets: list[str] = Field(min_length=1)  # decoder module names (q_proj, ..., or c_attn, ... for gpt2)
    vision: bool  # also LoRA on the trainable trunk blocks' 1x1 convolutions


class StudentConfig(_Section):
    """The student architecture and what every student stage shares (edgeqa.student)."""

    seed: int = Field(ge=0)
    image_size: int = Field(ge=64, le=1024)
    vision_blocks: int = Field(ge=1, le=16)  # Lite0 stem + blocks 0..vision_blocks-1
    frozen_blocks: int = Field(ge=0, le=16)  # the first ones stay frozen (their output is cached in training)
    grid: int = Field(ge=1, le=14)
    projector_hidden: int = Field(ge=16)
    augment_flip: bool  # mirrored copies of human-labelled images in training (location words swapped)
    decoder: DecoderConfig
    embed_init: Literal["teacher_pca", "random"]
    vocab_soft_min_prob: Fraction  # teacher soft-target tokens at least this likely join the pruned vocabulary
    min_param_ratio: float = Field(ge=1.0)  # the student must be this many times smaller than the teacher
    lora: LoraSettings
    batch_size: int = Field(ge=1, le=512)
    key_token_weight: float = Field(ge=1.0, le=100.0)
    aux_weight: float = Field(ge=0.0, le=100.0)  # train-only answer heads on the image embeddings (0: off)
    aux_fields: list[Literal["verdict", "defect_type", "location"]]  # which heads (verdict always)
    eval_every: int = Field(ge=1)  # optimizer steps between val evaluations (early stopping, curves)
    patience: int = Field(ge=1)  # evaluations without val-loss improvement before stopping
    threads: int = Field(ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # where the student stages train (edgeqa.distributed)
    micro_batches: int = Field(1, ge=1, le=64)  # shards a step's batch is cut into (at least torchrun's processes)
    processes: int = Field(1, ge=1, le=64)  # > 1: the student stages start themselves under torchrun

    @model_validator(mode="after")
    def _blocks(self) -> StudentConfig:
        if "verdict" not in self.aux_fields:
            raise ValueError(f"aux_fields {self.aux_fields} must include verdict (allowed: verdict, defect_type, "
                             "location)")
        if self.frozen_blocks > self.vision_blocks:
            raise ValueError(f"frozen_blocks ({self.frozen_blocks}) must be <= vision_blocks ({self.vision_blocks})")
        return self


class PasteConfig(_Section):
    """Synthetic defects pasted onto real good training images, to enlarge rare defect types. They are drawn
    by the synthetic generator's renderers, with this section's own size and contrast ranges."""

    enabled: bool
    per_type: int = Field(ge=0, le=10_000)  # pasted images per listed type
    # [dataset type, generator shape] pairs (a list, so profiles and `dvc exp run -S` can set it whole)
    renderers: list[tuple[str, Literal["crack", "scratch", "contamination", "broken", "stain", "hole"]]]
    seed: int = Field(ge=0)
    defect_scale: tuple[Fraction, Fraction]  # defect extent as a fraction of the image side
    contrast: tuple[Fraction, Fraction]  # intensity change as a fraction of 255

    @field_validator("defect_scale", "contrast")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(v)


def source_weights(v: dict[str, float]) -> dict[str, float]:
    if set(v) != {"human", "teacher"} or any(w < 0 for w in v.values()):
        raise ValueError("needs exactly {human: w, teacher: w} with w >= 0")
    return v


class StudentStageConfig(_Section):
    """What every student training stage sets: fine-tuning mode, a step budget, learning rates and the weight of
    each example source (human reference answers, the teacher's answers)."""

    finetune: Literal["full", "lora"]  # full | lora (LoRA merged into the saved model)
    steps: int = Field(ge=1)  # optimizer steps
    lr: float = Field(gt=0, le=1)
    lr_vision: float = Field(ge=0, le=1)  # the trainable trunk blocks (0: they stay frozen)
    weights: dict[Literal["human", "teacher"], float]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        return source_weights(v)


class SFTConfig(StudentStageConfig):
    """Stages `baseline` (human labels only: the teacher's weight is 0) and `sft` (human + teacher labels)."""

    min_teacher_confidence: Annotated[float, Field(ge=0.5, le=1.0)]  # max(P, 1-P) of the teacher's verdict
    paste: PasteConfig


class DistillConfig(StudentStageConfig):
    """Stage `distill`: alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE, from the sft model."""

    alpha: Fraction
    temperature: float = Field(gt=0, le=20)
    top_k: int = Field(ge=1, le=100)  # <= teacher.top_k (what label stored)


class LabelConfig(_Section):
    pools: list[Literal["labelled", "unlabelled"]] = Field(min_length=1)
    batch_size: int = Field(ge=1, le=256)


class EvaluateConfig(_Section):
    """Stage `evaluate`, a dvc.yaml foreach over `models`: THE model list. Model `name` lives in
    <paths.models_dir>/<name>; retention reads the rows in this order (teacher and baseline are required)."""

    models: list[str] = Field(min_length=1)
    split: Literal["test", "val"]
    batch_size: int = Field(ge=1, le=256)
    max_reason_tokens: int = Field(ge=1, le=256)  # the cap on each generated reason
    threads: int = Field(ge=1, le=64)
    bootstrap: int = Field(ge=0, le=100_000)  # paired bootstrap resamples for delta-AUROC intervals
    seed: int = Field(ge=0)
    reason_similarity: bool  # all-MiniLM-L6-v2 similarity of each reason to its reference

    @field_validator("models")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"model name {name!r}: use lower-case letters, digits and _ (it names a folder)")
        if len(set(v)) != len(v):
            raise ValueError(f"model names must be unique, got {v}")
        return v


class ThresholdRule(_Section):
    """The operating threshold on P(defective) the bundle ships, fitted on `val`: `max_miss_rate` (the highest
    threshold whose val miss rate is at most `max_miss_rate`) or `fixed` (`value`)."""

    rule: Literal["max_miss_rate", "fixed"]
    max_miss_rate: Fraction
    value: Fraction


class RecoveryConfig(_Section):
    """The KD fine-tune after each pruning step: the `distill` loss (alpha * T^2 * KL + (1 - alpha) * CE), full
    fine-tuning of the pruned layers. The soft targets come from `teacher`: the teacher's (what label stored) or
    the unpruned source student's own (self-distillation, the usual recovery after pruning)."""

    teacher: Literal["teacher", "source"]

    steps: int = Field(ge=1)  # optimizer steps per pruning step
    lr: float = Field(gt=0, le=1)
    lr_vision: float = Field(ge=0, le=1)
    weights: dict[Literal["human", "teacher"], float]
    alpha: Fraction
    temperature: float = Field(gt=0, le=20)
    top_k: int = Field(ge=1, le=100)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        return source_weights(v)


class PruneConfig(_Section):
    """Stage `prune`: structured pruning (torch-pruning) of the source student, iterative, each step recovered by
    KD and checked on `val`; the last step whose val AUROC drop stays within the budget is kept."""

    source: Literal["best", "baseline", "sft", "distill"]  # best: the student with the highest val AUROC
    steps: int = Field(ge=1, le=20)  # pruning steps; step k removes k/steps of each final ratio
    trunk_ratio: Annotated[float, Field(ge=0, lt=1)]  # expanded channels of the trained trunk blocks removed
    projector_ratio: Annotated[float, Field(ge=0, lt=1)]  # the projector's hidden width removed
    mlp_ratio: Annotated[float, Field(ge=0, lt=1)]  # each decoder layer's MLP width removed
    head_ratio: Annotated[float, Field(ge=0, lt=1)]  # each decoder layer's attention heads removed (whole heads)
    recovery: RecoveryConfig
    max_auroc_drop: Annotated[float, Field(ge=0, le=1)]  # budget: val delta AUROC's bootstrap CI low >= -budget
    bootstrap: int = Field(ge=0, le=100_000)
    latency_images: int = Field(ge=1, le=1000)  # val images timed per step (batch 1, one thread, PyTorch)
    max_reason_tokens: int = Field(ge=1, le=256)
    seed: int = Field(ge=0)
    threads: int = Field(ge=1, le=64)


class QuantizeConfig(_Section):
    """Stage `quantize`: ONNX export of the pruned student, INT8 (static QDQ, per-channel) of each graph that
    keeps answer agreement with FP32 on `val`, and the edge bundle."""

    op_types: list[Literal["MatMul", "Gemm", "Conv"]] = Field(min_length=1)  # what INT8 may touch
    per_channel: bool
    calibration_images: int = Field(ge=1, le=10_000)  # from the labelled (training) split only
    min_agreement: Fraction  # INT8 answers vs FP32 on val: same verdict, type and location
    max_reason_tokens: int = Field(ge=1, le=256)
    threshold: ThresholdRule
    bootstrap: int = Field(ge=0, le=100_000)
    seed: int = Field(ge=0)
    threads: int = Field(ge=1, le=64)


class GateRules(_Section):
    """The release policy: every rule the edge candidate must meet. The same values in every profile; a profile
    that needs an exception sets `gate.overrides.<rule>` and `gate.override_reason`, never these."""

    min_auroc: Fraction
    min_type_accuracy: Fraction
    min_parse_rate: Fraction
    max_miss_rate: Fraction  # at the bundle's shipped threshold
    max_overkill_rate: Fraction
    max_bundle_mb: float = Field(gt=0, le=10_000)  # every file of the bundle, manifest included (10^6 bytes)
    max_auroc_drop_vs_teacher: Fraction
    max_auroc_drop_vs_baseline: Fraction  # the seed's premise: not worse than a student on human labels alone
    max_type_accuracy_drop_vs_baseline: Fraction


class GateOverrides(_Section):
    """Explicit exceptions to `gate.rules`, one per rule (null: the policy holds). The report names each one."""

    min_auroc: Fraction | None = None
    min_type_accuracy: Fraction | None = None
    min_parse_rate: Fraction | None = None
    max_miss_rate: Fraction | None = None
    max_overkill_rate: Fraction | None = None
    max_bundle_mb: float | None = Field(default=None, gt=0, le=10_000)
    max_auroc_drop_vs_teacher: Fraction | None = None
    max_auroc_drop_vs_baseline: Fraction | None = None
    max_type_accuracy_drop_vs_baseline: Fraction | None = None


class GateConfig(_Section):
    """Stage `gate`: the absolute release rules, checked on the `evaluate` reports of the candidate (an edge
    bundle scored through the edge runtime), the teacher and the baseline."""

    candidate: str  # a model of evaluate.models whose folder is an edge bundle
    rules: GateRules
    overrides: GateOverrides
    override_reason: str  # required (non-empty) when any override is set

    @model_validator(mode="after")
    def _reason(self) -> GateConfig:
        set_ = [k for k, v in self.overrides.model_dump().items() if v is not None]
        if set_ and not self.override_reason.strip():
            raise ValueError(f"gate.overrides sets {set_}: gate.override_reason must say why (a non-empty text); "
                             "the gate report records it beside each overridden rule")
        return self


class ChallengerRules(_Section):
    """Champion/challenger (the `edgeqa-release` flow, never cached): the candidate against the bundle in
    production now, on the same test images, in the same run, on this machine's CPU."""
    max_auroc_drop: float = Field(ge=0, le=1)  # champion AUROC - candidate AUROC
    max_type_accuracy_drop: float = Field(ge=0, le=1)
    max_latency_ratio: float = Field(gt=0, le=100)  # candidate median ms / champion median ms, side by side


class Reviewer(_Section):
    """One person who may approve or reject a release for production; their decisions are signed with the
    private half of `public_key` (ed25519 PEM), which never enters the repository."""
    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,39}$")
    role: str = Field(min_length=1, max_length=60)
    public_key: str

    @field_validator("public_key")
    @classmethod
    def _pem(cls, v: str) -> str:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            k = serialization.load_pem_public_key(v.strip().encode())
        except ValueError as exc:
            raise ValueError(f"not a PEM public key ({exc}); `edgeqa keys reviewer NAME` prints one") from None
        if not isinstance(k, Ed25519PublicKey):
            raise ValueError(f"a {type(k).__name__}; reviewer keys are ed25519")
        return v


class ReleaseConfig(_Section):
    """The `edgeqa-release` flow: champion/challenger, latency, the registry and the wait for a human."""
    challenger: ChallengerRules
    threads: int = Field(ge=1, le=64)  # onnxruntime intra-op threads while both bundles answer
    max_reason_tokens: int = Field(ge=1, le=256)
    reviewers: list[Reviewer] = Field(default_factory=list)  # who may move production, by signed decision
    # the wait for a reviewer; a request older than this is refused: a timeout counts as a rejection
    approval_timeout_s: int = Field(default=604800, ge=60, le=90 * 86400)

    @model_validator(mode="after")
    def _unique(self) -> ReleaseConfig:
        names = [r.name for r in self.reviewers]
        if len(set(names)) != len(names):
            raise ValueError(f"reviewers: names must be unique, got {names}")
        keys = [r.public_key.strip() for r in self.reviewers]
        if len(set(keys)) != len(keys):
            raise ValueError("reviewers: each reviewer needs their own key (two entries share one)")
        return self


class NightlyConfig(_Section):
    """The `edgeqa-pipeline/nightly` deployment (`edgeqa up` applies it): when, and what it runs."""
    cron: str = "0 2 * * *"  # five fields, as cron
    timezone: str = "UTC"  # an IANA name: the schedule follows its daylight saving
    active: bool = True  # False: the deployment exists, its schedule is paused
    ref: str = "HEAD"  # the commit of the project the run checks out (a branch, tag or sha)
    profile: str | None = None  # written into the checkout's params.yaml, as `edgeqa profile apply`
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted key -> value, as `dvc exp run -S`
    release: bool = True  # then release the run's experiment commit through the gate

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        import datetime as dt

        from cronsim import CronSim, CronSimError  # the parser Prefect's own cron schedules use

        try:
            CronSim(v, dt.datetime(2026, 1, 1))
        except CronSimError as exc:
            raise ValueError(f"{v!r} is not a cron expression ({exc}); five fields: minute hour day month "
                             "weekday, e.g. '0 2 * * *'") from None
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return v


class DriftConfig(_Section):
    """`edgeqa drift`: the line's prediction logs (feedback/) against what the released model saw at test."""
    min_batch: int = Field(default=200, ge=1)  # fewer answers than this: no verdict, "too few"
    max_psi: float = Field(default=0.25, gt=0)  # population stability index of P(defective), 10 quantile bins
    max_defect_rate_shift: float = Field(default=0.15, gt=0, le=1)  # |share answered defective - test's|
    max_unseen_size_share: float = Field(default=0.05, ge=0, le=1)  # images of a size training never had
    max_image_shift: float = Field(default=0.5, gt=0)  # |batch mean - training's| / training's sd: brightness, contrast
    max_embedding_shift: float = Field(default=0.5, gt=0)  # |mean embedding - training's| / training's RMS spread
    reference_images: int = Field(default=200, ge=10, le=100_000)  # training images the image rules compare with


class OpsConfig(_Section):
    """Scheduled runs and the one-pipeline-at-a-time rule (never read by a stage)."""
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    # a second pipeline run waits this long for the `edgeqa-pipeline` concurrency slot, then fails naming it
    lock_wait_s: int = Field(default=6 * 3600, ge=0, le=7 * 86400)
    # the Prefect notification block (`<block type slug>/<name>`) the flows' completion and failure hooks use,
    # if it exists; the webhook URL lives in the block (a secret), never here
    notify_block: str = Field(default="custom-webhook/edgeqa-notify", pattern=r"^[a-z0-9-]+/[A-Za-z0-9_.-]+$")


class Params(_Section):
    paths: PathsConfig
    base_lm: BaseLMConfig
    teacher: TeacherConfig
    label: LabelConfig
    synth: SynthConfig
    ingest: IngestConfig
    validate_: ValidateConfig = Field(alias="validate")
    evaluate: EvaluateConfig
    student: StudentConfig
    sft: SFTConfig
    distill: DistillConfig
    prune: PruneConfig
    quantize: QuantizeConfig
    gate: GateConfig
    release: ReleaseConfig
    ops: OpsConfig = Field(default_factory=OpsConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        if self.distill.top_k > self.teacher.top_k:
            raise ValueError(f"distill.top_k ({self.distill.top_k}) must be <= teacher.top_k ({self.teacher.top_k}), "
                             "the number of soft targets label stores")
        if self.prune.recovery.top_k > self.teacher.top_k:
            raise ValueError(f"prune.recovery.top_k ({self.prune.recovery.top_k}) must be <= teacher.top_k "
                             f"({self.teacher.top_k}), the number of soft targets label stores")
        missing = [m for m in (self.gate.candidate, "teacher", "baseline") if m not in self.evaluate.models]
        if missing:
            raise ValueError(f"gate compares gate.candidate ({self.gate.candidate!r}) with teacher and baseline: "
                             f"{missing} must be in evaluate.models ({self.evaluate.models})")
        return self

    @property
    def validate_cfg(self) -> ValidateConfig:
        return self.validate_


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_params(data: object, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key and what is allowed."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _dotted(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (not in the params schema; check the spelling)"
            got = err.get("input")
            hide = err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict)
            shown = "" if hide else f" (got {got!r})"
            lines.append(f"  {key}: {msg}{shown}")
        raise ParamsError(f"{source}: invalid params:\n" + "\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    params = parse_params(data, str(path))
    trace.start(params)  # a no-op unless EDGEQA_TRACE_PARAMS is set
    return params
