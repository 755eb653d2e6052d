"""The teacher's supervised vision head: a verdict and a defect type read straight from Lite0's mid-level
features, trained on the labelled images before the LM.

Why: on magnetic tiles the LM's verdict and the frozen-feature patch kNN both stay near 0.7-0.8 val AUROC, while
a small student that retrains Lite0 blocks 8-10 on the human labels reaches 0.90. The defect signal is in the
stride-16 features once those blocks are trained for it. The head keeps its own copy of blocks 8-10 (ImageNet
start), trained from the frozen block-7 output; then 7x7 average- and max-pooled tokens, a token-wise MLP, and the
mean and max over the tokens (a small defect lights one token) feed a verdict and a type layer. Batch norm keeps
its ImageNet statistics. It trains a fixed number of steps (`teacher.vision_head_steps`) on the labelled images
and their mirror images, so `val` stays clean for the verdict ensemble and the type weight fitted on it.

Its verdict joins the LM and the anomaly kNN in the verdict ensemble; its type log-probabilities join the LM's
type choice with a weight fitted on val (edgeqa.teacher.sft). The teacher's answer, and so the labels it gives
its students, then carry what the head sees; the LM alone is still reported beside the ensemble.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeqa.errors import StageError
from edgeqa.progress import Progress

log = logging.getLogger("edgeqa.teacher_sft")

START, STOP = 8, 11  # Lite0 blocks 8..10 are retrained (stride 16, 112 channels); blocks 0..7 stay ImageNet's
HEAD_FILE = "vision_head.safetensors"


class VisionHead(nn.Module):
    """Verdict logit and type logits from the output of Lite0 block 7 (N, 80, H/16, W/16)."""

    def __init__(self, blocks: Sequence[nn.Module], n_types: int, grid: int, hidden: int):
        super().__init__()
        self.blocks = nn.ModuleList(copy.deepcopy(list(blocks)))
        self.blocks.requires_grad_(True)  # the copies train even where the teacher froze the backbone they came from
        self.grid, self.n_types, self.hidden = grid, n_types, hidden
        width = 2 * 112  # average and max pooled block-10 channels
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.verdict = nn.Linear(2 * hidden, 2)
        self.types = nn.Linear(2 * hidden, max(n_types, 1))

    @classmethod
    def from_backbone(cls, backbone: Any, n_types: int, grid: int, hidden: int) -> VisionHead:
        """A new head whose blocks start from the backbone's (ImageNet) blocks 8..10."""
        return cls([backbone._blocks[i] for i in range(START, STOP)], n_types, grid, hidden)

    def train(self, mode: bool = True) -> VisionHead:
        super().train(mode)
        for m in self.modules():  # batches of 16 cannot estimate batch-norm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, h7: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = h7
        for b in self.blocks:
            x = b(x, drop_connect_rate=0.0)
        g = self.grid
        t = torch.cat([F.adaptive_avg_pool2d(x, g), F.adaptive_max_pool2d(x, g)], 1).flatten(2).transpose(1, 2)
        e = self.mlp(t)
        z = torch.cat([e.mean(1), e.amax(1)], -1)
        v = self.verdict(z)
        return v[:, 1] - v[:, 0], self.types(z)[:, :self.n_types]

    def config(self) -> dict[str, int]:
        return {"grid": self.grid, "hidden": self.hidden, "n_types": self.n_types}


class HeadEnsemble(nn.Module):
    """`members` heads of one shape, each trained from its own seed; the verdict logit is their mean and the type
    log-probabilities are their mean log-probabilities (renormalised). One head's val AUROC moves by several
    hundredths with its seed on 26 defective magnetic-tile val images; the mean of a few does not."""

    def __init__(self, heads: Sequence[VisionHead]):
        super().__init__()
        if not heads:
            raise ValueError("HeadEnsemble needs at least one head")
        self.heads = nn.ModuleList(heads)

    @classmethod
    def from_backbone(cls, backbone: Any, n_types: int, grid: int, hidden: int, members: int) -> HeadEnsemble:
        return cls([VisionHead.from_backbone(backbone, n_types, grid, hidden) for _ in range(members)])

    def members(self) -> list[VisionHead]:
        return [cast(VisionHead, h) for h in self.heads]

    @property
    def n_types(self) -> int:
        return self.members()[0].n_types

    def forward(self, h7: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vs, ts = zip(*(h(h7) for h in self.members()))
        t = torch.stack([torch.log_softmax(x, -1) for x in ts]).mean(0) if self.n_types else torch.stack(ts).mean(0)
        return torch.stack(vs).mean(0), t

    def config(self) -> dict[str, int]:
        return {**self.members()[0].config(), "members": len(self.heads)}


def train_heads(heads: HeadEnsemble, h7: torch.Tensor, defective: np.ndarray, type_idx: np.ndarray, steps: int,
                lr: float, lr_vision: float, batch_size: int, seed: int) -> list[dict[str, float]]:
    """Each member trained by `train_head` from seed `seed + i`; the curve is the mean loss over members."""
    curves = [train_head(h, h7, defective, type_idx, steps, lr, lr_vision, batch_size, seed + i,
                         label=f"vision head {i + 1}/{len(heads.heads)}") for i, h in enumerate(heads.members())]
    return [{"step": c[0]["step"], "loss": float(np.mean([x["loss"] for x in c]))} for c in zip(*curves)]


def train_head(head: VisionHead, h7: torch.Tensor, defective: np.ndarray, type_idx: np.ndarray, steps: int,
               lr: float, lr_vision: float, batch_size: int, seed: int, label: str = "vision head"
               ) -> list[dict[str, float]]:
    """Cross-entropy on the verdict of every image plus on the type of the defective images with a known type
    (`type_idx` -1 where none). A fixed number of steps with a cosine learning-rate decay, no early stopping: val
    is left to the ensemble."""
    if len(h7) != len(defective) or len(h7) != len(type_idx):
        raise ValueError(f"train_head: {len(h7)} feature rows, {len(defective)} verdicts, {len(type_idx)} types")
    if len(set(defective.tolist())) < 2:
        raise StageError("teacher.vision_head_steps > 0 needs good and defective labelled images; the labelled "
                         f"split has only {'defective' if defective.all() else 'good'} ones")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    for m in head.modules():  # the new layers from the seed, so a rerun trains the same head
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=gen)
            nn.init.zeros_(m.bias)
    opt = torch.optim.AdamW([{"params": [*head.mlp.parameters(), *head.verdict.parameters(),
                                         *head.types.parameters()], "lr": lr},
                             {"params": list(head.blocks.parameters()), "lr": lr_vision}], weight_decay=0.0)
    # cosine decay to 0: the fixed step budget ends in a settled state (magnetic-tile val, seeds 0 / 1, 400 steps:
    # constant lr 0.960 / 0.902, cosine 0.965 / 0.982)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + float(np.cos(np.pi * min(k, steps) / steps))))
    y, t = torch.from_numpy(defective.astype(np.int64)), torch.from_numpy(type_idx.astype(np.int64))
    head.train()
    prog = Progress(log, label, steps, "steps")
    order, curve = np.zeros(0, np.int64), []
    for step in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(h7))])
        idx, order = torch.from_numpy(order[:batch_size]), order[batch_size:]
        v, tl = head(h7[idx])
        loss = F.binary_cross_entropy_with_logits(v, y[idx].float())
        known = t[idx] >= 0
        if bool(known.any()) and head.n_types:
            loss = loss + F.cross_entropy(tl[known], t[idx][known])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": float(loss.item())})
        prog.update(step + 1, loss=float(loss.item()))
    head.eval()
    return curve


def head_scores(head: VisionHead | HeadEnsemble, h7: torch.Tensor, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(verdict logits (N,), type log-probabilities (N, n_types)) without gradients."""
    vs, ts = [], []
    head.eval()
    with torch.inference_mode():
        for i in range(0, len(h7), batch):
            v, t = head(h7[i:i + batch])
            vs.append(v.float().numpy())
            ts.append(torch.log_softmax(t.float(), -1).numpy() if head.n_types else t.float().numpy())
    return np.concatenate(vs), np.concatenate(ts)


def save_head(head: HeadEnsemble, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_head(path: Path, backbone: Any, cfg: dict[str, int]) -> HeadEnsemble:
    """The heads a teacher folder saved; a missing file, a foreign tensor or a wrong shape is refused by name."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise StageError(f"{path} is missing: teacher.json names a vision head; rerun teacher_sft")
    head = HeadEnsemble.from_backbone(backbone, int(cfg["n_types"]), int(cfg["grid"]), int(cfg["hidden"]),
                                      int(cfg.get("members", 1)))
    state, own = load_file(str(path)), head.state_dict()
    for k, v in state.items():
        if k not in own:
            raise StageError(f"{path}: tensor {k!r} is not a parameter of the teacher's vision head")
        if tuple(v.shape) != tuple(own[k].shape):
            raise StageError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the head has {tuple(own[k].shape)}")
    missing = sorted(set(own) - set(state))
    if missing:
        raise StageError(f"{path}: tensors {missing[:3]} of the vision head are missing")
    head.load_state_dict(state)
    return head.eval()


def trunk_output(backbone: Any, paths: Sequence[str], size: int, stop: int, device: Any = "cpu",
                 flip: bool = False, batch: int = 32) -> torch.Tensor:
    """The output of Lite0's stem and blocks 0..stop-1 for image files (optionally mirrored), computed once."""
    from edgeqa.vlm.vision import lite0_trunk, to_tensor

    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = to_tensor(list(paths[i:i + batch]), size).to(device)
            out.append(lite0_trunk(backbone, torch.flip(x, dims=[3]) if flip else x, stop))
    return torch.cat(out).clone()
