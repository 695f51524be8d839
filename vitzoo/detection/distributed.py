"""Process-group set-up for ``torchrun`` (DDP): read the env vars, pick the backend and the device."""
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ['DistContext', 'init_distributed']


@dataclass
class DistContext:
    """Where this process stands in the job."""
    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (a one-element list when not distributed)."""
        if not self.initialized:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Join the process group when ``WORLD_SIZE > 1`` (``torchrun`` sets it), else run as a single process.

    Args:
        device: ``'cpu'``, ``'cuda'`` (the local GPU ``LOCAL_RANK`` is used under DDP) or None (CUDA when available).
            The backend is NCCL on CUDA and Gloo on the CPU.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    kind = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if kind.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ValueError('--device cuda was asked for but CUDA is not available; use --device cpu.')
        dev = torch.device('cuda', local_rank) if world > 1 else torch.device(kind)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo')
    return DistContext(world, rank, local_rank, dev)
