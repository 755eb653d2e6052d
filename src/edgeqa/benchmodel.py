"""One model's speed and memory, measured in a process of its own so that its peak RSS is the model's:
`python -m edgeqa.benchmodel KIND FOLDER PATHS_JSON MAX_REASON_TOKENS` prints one JSON object.

KIND: `teacher` (LocalTeacher), `student` (a saved student, PyTorch), `edge` (a bundle, onnxruntime) or
`patchknn` (the classical row: the teacher folder's patch-kNN anomaly detector alone, on the same ImageNet
backbone; a score, no type, no reason; it also prints its score for every image, for the AUROC). Latency
is at batch 1 on one thread, from the image file to the answer, after one warm-up; throughput is at batch 8 on
two threads. `make bench` (`edgeqa.bench.models_bench`) runs it once per model.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH, BATCH_THREADS = 8, 2


class PatchKNN:
    """A PatchCore-style detector: Lite0 stride-16 features, 3x3 neighbourhood-averaged, nearest neighbour in the
    memory bank of good training patches (the full bank: no coreset), the image score the largest patch
    distance. The bank and the scoring are the local teacher's anomaly evidence (`edgeqa.teacher.local`); with a
    tuned-vision teacher, its tuned blocks give the features, as they gave the bank."""

    def __init__(self, folder: Path, threads: int):
        import torch
        from safetensors.numpy import load_file

        from edgeqa.teacher.local import teacher_backbone

        torch.set_num_threads(threads)
        meta = json.loads((folder / "teacher.json").read_text())
        if not meta.get("anomaly"):
            raise SystemExit(f"benchmodel patchknn: {folder} holds no anomaly bank (teacher anomaly evidence off)")
        self.size, self.grid = int(meta["image_size"]), int(meta["grid"])
        self.backbone = teacher_backbone(folder, meta.get("vision_tuned_from"))
        self.bank = load_file(str(folder / "anomaly_bank.safetensors"))["bank"]

    def predict_paths(self, paths: list[str], max_reason_tokens: int) -> list[dict[str, Any]]:
        from edgeqa.teacher.local import anomaly_scores
        from edgeqa.vlm.vision import image_features

        f = image_features(self.backbone, paths, self.size, self.grid)
        return [{"anomaly_score": float(a)} for a in anomaly_scores(f["patches"], self.bank)]


def _load(kind: str, folder: Path, threads: int) -> Any:
    if kind == "patchknn":
        return PatchKNN(folder, threads)
    if kind == "teacher":
        from edgeqa.teacher.local import LocalTeacher

        return LocalTeacher(folder, threads)
    if kind == "student":
        import torch

        from edgeqa.student.model import Student

        torch.set_num_threads(threads)
        return Student(folder, threads)
    if kind == "edge":
        from edgeqa_runtime.session import OrtStudent

        return OrtStudent(folder, threads)
    raise SystemExit(f"benchmodel: KIND {kind!r} is not one of teacher, student, edge, patchknn")


def _answer(kind: str, m: Any, paths: list[str], n_tok: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = m.predict_paths(paths, n_tok, 1) if kind == "teacher" else m.predict_paths(paths,
                                                                                                            n_tok)
    return out


def measure(kind: str, folder: Path, paths: list[str], n_tok: int, latency_images: int = 50) -> dict[str, Any]:
    m = _load(kind, folder, 1)
    _answer(kind, m, paths[:1], n_tok)
    ms = []
    for p in paths[:latency_images]:
        t0 = time.perf_counter()
        _answer(kind, m, [p], n_tok)
        ms.append((time.perf_counter() - t0) * 1000)
    res: dict[str, Any] = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                           "latency_images": len(ms)}
    mb = _load(kind, folder, BATCH_THREADS)
    batch = paths[:2 * BATCH]
    _answer(kind, mb, batch[:BATCH], n_tok)
    t0 = time.perf_counter()
    for i in range(0, len(batch), BATCH):
        _answer(kind, mb, batch[i:i + BATCH], n_tok)
    res["images_per_s_batch8_2threads"] = len(batch) / (time.perf_counter() - t0)
    if kind == "student":
        from edgeqa.compress.prune import macs

        layout = m.vlm.layout
        res["macs"] = macs(m.model, len(layout.pre) + len(layout.post))["total"]
    if kind == "patchknn":
        res["scores"] = [r["anomaly_score"] for r in _answer(kind, mb, paths, n_tok)]
        res["bank_rows"], res["bank_bytes"] = int(m.bank.shape[0]), int(m.bank.nbytes)
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def peak_rss_bytes() -> int:
    """This process's own peak RSS. Linux keeps `ru_maxrss` across fork + exec, so a child started by a big
    parent reports the parent's peak (every student row once read 1997 MiB, the bench process's size);
    `VmHWM` belongs to the process's own address space, which exec replaces."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> None:
    a = sys.argv[1:] if argv is None else argv
    if len(a) != 4:
        raise SystemExit(__doc__)
    kind, folder, paths_file, n_tok = a
    paths = json.loads(Path(paths_file).read_text())
    print(json.dumps(measure(kind, Path(folder), paths, int(n_tok))))


if __name__ == "__main__":
    main()
