"""Process-group set-up for ``torchrun`` (DDP): read the env vars, pick the backend and the device."""
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ['DistContext', 'PROCESS_GROUP_TIMEOUT', 'check_device', 'init_distributed']

#: How long a collective may wait. Only rank 0 evaluates while the other ranks wait at a barrier, and a COCO
#: evaluation on one GPU (Mask R-CNN: mask encoding and segm COCOeval) can take longer than NCCL's default 10 min,
#: after which NCCL's watchdog would abort the job.
PROCESS_GROUP_TIMEOUT = timedelta(hours=3)


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

    def ranks_where(self, flag: bool) -> List[int]:
        """The ranks whose ``flag`` is true (``[0]`` or ``[]`` when not distributed); a collective call.

        Every rank learns the same list, so all of them can stop together: a rank that stopped alone would leave
        the others waiting in DDP's next gradient all-reduce.
        """
        if not self.initialized:
            return [0] if flag else []
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(flag)
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` averaged over the ranks (themselves when not distributed); a collective call."""
        if not self.initialized:
            return values
        values = values.detach().clone()
        dist.all_reduce(values)
        return values / self.world_size

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


def check_device(device: Optional[str]) -> torch.device:
    """The device ``--device`` names (None: CUDA when available, else the CPU), checked before any work.

    Raises:
        ValueError: not a device string, a kind other than ``cpu`` / ``cuda`` / ``mps``, or one this machine lacks
            (``cuda`` without CUDA, ``cuda:N`` beyond the GPUs there are).
    """
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f'--device {device!r} is not a device; use cpu, cuda or cuda:N.') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'--device {device} was asked for but CUDA is not available; use --device cpu.')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f'--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) '
                             f'(cuda:0 .. cuda:{torch.cuda.device_count() - 1}).')
    elif dev.type == 'mps':
        if not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
            raise ValueError(f'--device {device} was asked for but MPS is not available; use --device cpu.')
    elif dev.type != 'cpu':
        raise ValueError(f'--device {device}: only cpu, cuda[:N] and mps are supported.')
    return dev


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Join the process group when ``WORLD_SIZE > 1`` (``torchrun`` sets it), else run as a single process.

    Args:
        device: ``'cpu'``, ``'cuda'`` (the local GPU ``LOCAL_RANK`` is used under DDP) or None (CUDA when available).
            The backend is NCCL on CUDA and Gloo on the CPU.

    Raises:
        ValueError: see :func:`check_device`; or, on CUDA, a ``LOCAL_RANK`` beyond the GPUs this process sees.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = check_device(device)
    if dev.type == 'cuda':
        if world > 1:
            if local_rank >= torch.cuda.device_count():  # found by an audit: "invalid device ordinal" traceback
                raise ValueError(f'LOCAL_RANK {local_rank}, but this machine shows {torch.cuda.device_count()} CUDA '
                                 f'device(s): start at most that many processes per node (torchrun '
                                 f'--nproc_per_node), or check CUDA_VISIBLE_DEVICES.')
            dev = torch.device('cuda', local_rank)
        elif dev.index is None:  # set_device needs an index: plain 'cuda' is the current GPU
            dev = torch.device('cuda', torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if dev.type == 'cuda' else 'gloo', timeout=PROCESS_GROUP_TIMEOUT)
    return DistContext(world, rank, local_rank, dev)
