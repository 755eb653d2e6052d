from pathlib import Path

import numpy as np
from PIL import Image


def img(path: Path, size=(64, 64), mode="RGB", value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, np.uint8)
    arr = arr + np.random.default_rng(abs(hash(str(path))) % 2**32).integers(0, 20, arr.shape, dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def mask(path: Path, size=(64, 64), box=(10, 10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)
    return path


def mvtec(root: Path, cat="widget", goods=8, defects=("dent", "scratch"), per=6) -> Path:
    for i in range(goods):
        img(root / cat / "train" / "good" / f"{i:03d}.png")
    for d in defects:
        for i in range(per):
            img(root / cat / "test" / d / f"{i:03d}.png")
            mask(root / cat / "ground_truth" / d / f"{i:03d}_mask.png")
    return root
