"""Training checkpoints: atomic writes and the random-number-generator state needed for an exact resume."""
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from vitzoo.atomic import atomic_open

__all__ = ['atomic_save', 'get_rng_state', 'load_checkpoint', 'set_rng_state']


def atomic_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it onto ``path``.

    A crash while writing never leaves a truncated checkpoint behind.
    """
    with atomic_open(path, force=True) as f:  # periodic checkpoints replace the previous one on purpose
        torch.save(obj, f)
    return Path(path)


def get_rng_state(generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
    """State of python, numpy, torch (CPU and CUDA) and an optional extra torch generator."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state['generator'] = generator.get_state()
    return state


def set_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Restore what :func:`get_rng_state` captured."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if generator is not None and 'generator' in state:
        generator.set_state(state['generator'])


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a training checkpoint written by ``vitzoo finetune-det`` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} not found; give a checkpoint_*.pth written by finetune-det.')
    ckpt = torch.load(path, map_location='cpu', weights_only=False)
    missing = [k for k in ('model', 'optimizer', 'scheduler', 'epoch', 'step', 'iteration') if k not in ckpt]
    if missing:
        raise ValueError(f'{path} is not a finetune-det training checkpoint (missing {missing}).')
    return ckpt
