"""Where a training stage runs: the device setting (`auto` | `cpu` | `cuda`) and, under `torchrun`, the process group
(gloo on the CPU, NCCL on CUDA).

A step's global batch is cut into `n` equal shards, `n` = max(processes, micro_batches); each process takes every
`world`-th shard, back-propagates each shard's loss / n, and the gradients are summed across processes with
`all_reduce` (what DistributedDataParallel does, without wrapping the model: the stages' forward passes go through
the projector and the LM separately). With more than one shard, the random streams a shard's forward draws from
(drop-connect, dropout) are seeded by (seed, step, shard), not by the process. So `torchrun --nproc_per_node=k`
trains the same model as one process with `micro_batches: k`, up to floating-point summation order; every process
holds the same weights after each step and takes the same early-stopping decision, and only rank 0 writes files.

`student.processes` > 1 makes a student stage start itself again under torchrun (`relaunch`), so `dvc repro` and
the stage's command line in dvc.yaml stay as they are; `torchrun ... -m tasks.sft ...` by hand works too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from edgeqa.errors import StageError

if TYPE_CHECKING:
    import argparse

    from edgeqa.config import Params

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shards(self, n_items: int, micro_batches: int, key: str = "student.micro_batches"
               ) -> tuple[int, list[tuple[int, list[int]]]]:
        """(n, this process's shards of a batch of `n_items`: (shard number, positions)). A batch smaller than `n`
        (an epoch's last) leaves some shards empty."""
        n = self.n_shards(micro_batches, key)
        bounds = [round(i * n_items / n) for i in range(n + 1)]
        return n, [(k, list(range(bounds[k], bounds[k + 1]))) for k in range(n) if k % self.world == self.rank]

    def n_shards(self, micro_batches: int, key: str = "student.micro_batches") -> int:
        n = max(self.world, micro_batches)
        if n % self.world:
            raise StageError(f"{key} {micro_batches} is not a multiple of the {self.world} torchrun processes; "
                             f"allowed: 1 or a multiple of {self.world}")
        return n

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over the processes (a missing gradient counts as zero)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def sum_scalar(self, x: float) -> float:
        if not self.distributed:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def sync_module(self, module: torch.nn.Module) -> None:
        """Every process starts from rank 0's weights and buffers."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def resolve(setting: str, key: str = "student.device") -> torch.device:
    """The device a setting names on this machine; `cuda` without a CUDA device is refused, naming the key."""
    if setting not in ("auto", "cpu", "cuda"):
        raise StageError(f"{key}: {setting!r}; allowed: auto, cpu, cuda")
    has_cuda = torch.cuda.is_available()
    if setting == "cuda" and not has_cuda:
        raise StageError(f"{key}: cuda, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"torch.version.cuda {torch.version.cuda}); use cpu or auto")
    if setting == "cuda" or (setting == "auto" and has_cuda):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def setup(setting: str, key: str = "student.device") -> Runtime:
    """The runtime of this process: one process, or one of torchrun's (WORLD_SIZE, RANK, LOCAL_RANK set), the
    process group joined on first use."""
    device = resolve(setting, key)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(device)
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def seed_shard(seed: int, step: int, shard: int) -> None:
    """The random streams of one shard's forward pass (CPU and CUDA), the same in any process layout."""
    torch.manual_seed((seed * 1_000_003 + step * 4_099 + shard) % (2**63 - 1))


def relaunch(processes: int, module: str, argv: Sequence[str], key: str = "student.processes") -> int | None:
    """With `processes` > 1 and not yet under torchrun: run `module` with `argv` as `processes` torchrun
    workers on this machine (`--standalone`: a rendezvous on a free loopback port) and return their exit code.
    None: run here (one process, or already one of torchrun's)."""
    if processes <= 1 or "WORLD_SIZE" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", module, *argv]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                          ).returncode


def torchrun_or_here(module: str, argv: Sequence[str], run: Callable[[Params, argparse.Namespace], object]
                     ) -> Callable[[Params, argparse.Namespace], object]:
    """A student stage's run (for edgeqa.stage.stage_main): here, or, with `student.processes` > 1, the same
    command again as that many torchrun processes."""

    def go(p: Params, a: argparse.Namespace) -> object:
        code = relaunch(p.student.processes, module, argv)
        if code is None:
            return run(p, a)
        if code != 0:
            raise StageError(f"{module} under torchrun (student.processes {p.student.processes}) exited {code}; "
                             "each process's error is above")
        return None

    return go
