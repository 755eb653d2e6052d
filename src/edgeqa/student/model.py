"""The student: a small generative vision-language model for the edge, built from transformers classes.

    image -> EfficientNet-Lite0 stem + blocks 0..N-1 (ImageNet weights; the first ones frozen)
          -> avg+max pooled grid tokens -> projector -> prefix embeddings
          -> a small causal decoder (Llama-style by default, all nn.Linear; or GPT-2) over a PRUNED vocabulary

It answers the teacher's prompt in the teacher's schema through the same code (`edgeqa.vlm.model.VisionLM`):
verdict, type and location from its own scores over the closed sets, only the reason generated.

The decoder's vocabulary is pruned to the tokens the domain uses (`edgeqa.student.vocab`). The whole model
saves and loads with `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from edgeqa.errors import StageError
from edgeqa.io import folder_fingerprint
from edgeqa.vlm.model import Projector, ProjectorConfig
from edgeqa_runtime.schema import AnswerSchema

LITE0_CHANNELS = (16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320)  # block outputs
LITE0_STRIDES = (2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32)  # block outputs, against the input
TOKENIZER_DIR = "tokenizer"  # the teacher tokenizer, saved beside the weights


def check_geometry(vision_blocks: int, image_size: int, grid: int) -> None:
    """The trunk's map must pool evenly into the grid: the ONNX export (and so the edge bundle) takes only
    uniform pooling windows. Checked when a student is built, so a bad combination stops the first training
    stage, not `quantize` after all training."""
    stride = LITE0_STRIDES[vision_blocks - 1]
    side = image_size // stride
    if image_size % stride or side % grid:
        ok = [g for g in range(1, side + 1) if side % g == 0] if image_size % stride == 0 else []
        raise StageError(
            f"student.image_size {image_size} with student.vision_blocks {vision_blocks} gives a "
            f"{image_size / stride:g}x{image_size / stride:g} map (stride {stride}), which student.grid {grid} does "
            f"not divide: the edge export needs uniform pooling. Use an image_size that is a multiple of {stride}, "
            + (f"and at {image_size} px a grid in {ok}." if ok else "and a grid that divides image_size/stride."))


class StudentModelConfig(PretrainedConfig):
    model_type = "edgeqa_student"

    def __init__(self, vision_blocks: int = 11, frozen_blocks: int = 8, image_size: int = 224, grid: int = 7,
                 projector_hidden: int = 256, decoder: dict[str, Any] | None = None,
                 vocab_map: list[int] | None = None, types: list[str] | None = None,
                 locations: list[str] | None = None, verdict_temperature: float = 1.0,
                 type_temperature: float = 1.0, block_widths: dict[str, int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.vision_blocks, self.frozen_blocks = vision_blocks, frozen_blocks
        # pruned trunk blocks: block index (str, as JSON keys are) -> expanded (inner) channels; absent: Lite0's
        self.block_widths = {str(k): int(v) for k, v in (block_widths or {}).items()}
        self.image_size, self.grid, self.projector_hidden = image_size, grid, projector_hidden
        self.decoder = decoder or {}
        self.vocab_map = list(vocab_map or [])
        self.types, self.locations = list(types or []), list(locations or [])
        self.verdict_temperature, self.type_temperature = verdict_temperature, type_temperature

    @property
    def feature_dim(self) -> int:
        return 2 * LITE0_CHANNELS[self.vision_blocks - 1]

    def schema(self) -> AnswerSchema:
        return AnswerSchema(types=tuple(self.types), locations=tuple(self.locations))

    def decoder_config(self) -> PretrainedConfig:
        from transformers import AutoConfig

        d = dict(self.decoder)
        return AutoConfig.for_model(d.pop("model_type"), **d)


def decoder_config_dict(arch: str, vocab_size: int, hidden: int, layers: int, heads: int, intermediate: int,
                        max_positions: int, pad_id: int, eos_id: int) -> dict[str, Any]:
    """A small causal decoder config: `llama` (nn.Linear blocks, RoPE; the default) or `gpt2` (Conv1D blocks,
    learned positions: the seed's "GPT-2 as the LLM part")."""
    if arch == "llama":
        return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers,
                "num_attention_heads": heads, "num_key_value_heads": heads, "intermediate_size": intermediate,
                "max_position_embeddings": max_positions, "tie_word_embeddings": True, "pad_token_id": pad_id,
                "eos_token_id": eos_id, "bos_token_id": eos_id, "rms_norm_eps": 1e-5}
    if arch == "gpt2":
        return {"model_type": "gpt2", "vocab_size": vocab_size, "n_embd": hidden, "n_layer": layers, "n_head": heads,
                "n_inner": intermediate, "n_positions": max_positions, "tie_word_embeddings": True,
                "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": eos_id}
    raise StageError(f"student.decoder.arch {arch!r} is not known; allowed: llama, gpt2")


class VisionTrunk(nn.Module):
    """Lite0's stem and its first `vision_blocks` blocks (stride 16 at block 11: 112 channels). `widths` narrows
    the inner (expanded) channels of the blocks it names, as `prune` left them, so a pruned trunk rebuilds."""

    def __init__(self, n_blocks: int, widths: dict[str, int] | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        full = EfficientNet.from_name("efficientnet-lite0")
        full.set_swish(memory_efficient=False)
        self.stem = nn.Sequential(full._conv_stem, full._bn0, full._swish)
        self.blocks = nn.ModuleList(full._blocks[:n_blocks])
        for b in self.blocks:  # 1x1 convs as plain nn.Conv2d (same weights): PEFT LoRA and the exporters take them
            for name in ("_expand_conv", "_project_conv"):
                c = getattr(b, name, None)
                if c is not None and c.kernel_size == (1, 1) and c.stride == (1, 1):
                    setattr(b, name, nn.Conv2d(c.in_channels, c.out_channels, 1, bias=c.bias is not None))
        for k, w in (widths or {}).items():
            narrow_block(self.blocks[int(k)], w)

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks [start, stop); start 0 runs the stem first."""
        if start == 0:
            x = self.stem(x)
        for b in self.blocks[start:stop]:
            x = b(x, drop_connect_rate=0.0)
        return x


def inner_width(block: nn.Module) -> int:
    """The expanded channels of an MBConv block (the depthwise conv's)."""
    conv: nn.Conv2d = block._depthwise_conv  # type: ignore[assignment]
    return int(conv.out_channels)


def narrow_block(block: nn.Module, width: int) -> None:
    """Cut an MBConv block's inner channels to `width` (the last ones go; weights are loaded afterwards): the
    same layers torch-pruning's dependency group for the expand conv touches. Block output stays as it is."""
    import torch_pruning as tp

    if getattr(block, "_expand_conv", None) is None or getattr(block, "has_se", False):
        raise StageError("student.block_widths names a block with no expand conv or with squeeze-excitation; only "
                         "Lite0's plain MBConv blocks (1..15) can be narrowed")
    drop = list(range(width, inner_width(block)))
    if not drop:
        return
    tp.prune_conv_out_channels(block._expand_conv, drop)
    tp.prune_batchnorm_out_channels(block._bn0, drop)
    tp.prune_depthwise_conv_out_channels(block._depthwise_conv, drop)
    tp.prune_batchnorm_out_channels(block._bn1, drop)
    tp.prune_conv_in_channels(block._project_conv, drop)


class StudentModel(PreTrainedModel):
    config_class = StudentModelConfig
    base_model_prefix = "student"
    _no_split_modules: list[str] = []

    def __init__(self, config: StudentModelConfig):
        super().__init__(config)
        from transformers import AutoModelForCausalLM

        check_geometry(config.vision_blocks, config.image_size, config.grid)
        self.vision = VisionTrunk(config.vision_blocks, config.block_widths)
        self.projector = Projector(ProjectorConfig(in_dim=config.feature_dim, n_tokens=config.grid * config.grid,
                                                   lm_hidden=_hidden(config.decoder), hidden=config.projector_hidden))
        self.decoder = AutoModelForCausalLM.from_config(config.decoder_config())
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # submodules initialise themselves
        pass

    def frozen_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The output of the frozen part of the trunk (cached by training stages); the pixels when none is."""
        if self.config.frozen_blocks == 0:
            return pixels
        return self.vision(pixels, 0, self.config.frozen_blocks)

    def tokens_from_frozen(self, h: torch.Tensor) -> torch.Tensor:
        """Trainable blocks, then grid average+max pooling: image tokens (batch, grid*grid, feature_dim)."""
        import torch.nn.functional as F

        if self.config.frozen_blocks == 0:
            h = self.vision(h, 0, None)
        elif self.config.frozen_blocks < self.config.vision_blocks:
            h = self.vision(h, self.config.frozen_blocks, None)
        g = self.config.grid
        t = torch.cat([F.adaptive_avg_pool2d(h, g), F.adaptive_max_pool2d(h, g)], 1)
        return t.flatten(2).transpose(1, 2)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tokens_from_frozen(self.frozen_features(pixels))

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings for the decoder (the exported vision graph)."""
        return self.projector(self.image_tokens(pixels))

    def set_trainable(self, vision: bool = True) -> None:
        """Frozen trunk blocks stay frozen, and every BatchNorm keeps its ImageNet statistics (eval mode)."""
        for i, b in enumerate(self.vision.blocks):
            for q in b.parameters():
                q.requires_grad_(vision and i >= self.config.frozen_blocks)
        for q in self.vision.stem.parameters():
            q.requires_grad_(vision and self.config.frozen_blocks == 0)

    def train(self, mode: bool = True) -> StudentModel:
        super().train(mode)
        for m in self.vision.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def _hidden(decoder: dict[str, Any]) -> int:
    size = decoder.get("hidden_size") or decoder.get("n_embd")
    if size is None:
        raise ValueError(f"the decoder config has neither hidden_size nor n_embd (keys: {sorted(decoder)})")
    return int(size)


def lite0_into(trunk: VisionTrunk) -> None:
    """Copy the ImageNet EfficientNet-Lite0 weights (from the offline weights package) into a trunk."""
    from edgeqa.vlm.vision import load_lite0

    full = load_lite0()
    trunk.stem[0].load_state_dict(full._conv_stem.state_dict())
    trunk.stem[1].load_state_dict(full._bn0.state_dict())
    for b, src in zip(trunk.blocks, full._blocks):
        b.load_state_dict(src.state_dict())


# --------------------------------------------------------------------------------------- the runtime wrapper
def is_student_folder(folder: Path) -> bool:
    f = Path(folder) / "config.json"
    return f.is_file() and json.loads(f.read_text()).get("model_type") == StudentModelConfig.model_type


class Student:
    """A saved student, answering images the way `LocalTeacher` does (same prompt, schema, scorer, generator)."""

    def __init__(self, folder: Path, threads: int = 2):
        from transformers import AutoTokenizer

        from edgeqa.student.vocab import PrunedTokenizer
        from edgeqa.vlm.model import Layout, VisionLM

        folder = Path(folder)
        if not is_student_folder(folder):
            raise StageError(f"{folder} is not a student folder (no config.json of model_type "
                             f"{StudentModelConfig.model_type!r}); run the sft or distill stage")
        torch.set_num_threads(threads)
        self.folder = folder
        self.model = StudentModel.from_pretrained(folder).eval()
        self.meta = self.model.config
        self.tok = PrunedTokenizer(AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR), self.meta.vocab_map)
        self.vlm = VisionLM(self.model.decoder, self.tok, self.model.projector,
                            Layout.build(self.tok, self.meta.schema()), self.meta.verdict_temperature,
                            self.meta.type_temperature)
        self.fingerprint = folder_fingerprint(folder)

    def schema(self) -> AnswerSchema:
        return self.meta.schema()

    def usage(self) -> None:
        return None

    def parameters(self) -> int:
        """Every parameter in the files loaded at inference (embeddings included; tied ones counted once)."""
        return count_parameters(self.model)

    def predict_paths(self, paths: Sequence[str], max_reason_tokens: int, top_k: int = 1, strict: bool = False
                      ) -> list[dict[str, Any]]:
        from edgeqa.vlm.vision import to_tensor

        with torch.inference_mode():
            tokens = self.model.image_tokens(to_tensor(paths, self.meta.image_size))
        preds = self.vlm.predict(tokens, max_reason_tokens, top_k,
                                 min_reason_tokens=min(3, max_reason_tokens) if strict else 0)
        out = []
        for pr in preds:
            rec = asdict(pr)
            rec["answer"] = asdict(pr.answer)
            rec["p_defective_lm"] = None  # the student's own score IS its answer: no separate LM-alone row
            rec["anomaly_score"] = None
            out.append(rec)
        return out


def count_parameters(model: nn.Module) -> int:
    """Parameters plus buffers that hold learned or fitted values, each shared tensor counted once."""
    seen: set[int] = set()
    n = 0
    buffers = [b for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")]
    for t in list(model.parameters()) + buffers:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    return n
