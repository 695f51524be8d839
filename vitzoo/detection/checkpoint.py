"""Training checkpoints: atomic writes and the random-number-generator state needed for an exact resume."""
import random
import re
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from vitzoo.atomic import atomic_open

__all__ = ['atomic_save', 'get_rng_state', 'load_checkpoint', 'numpy_data_globals', 'set_rng_state']


def numpy_data_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow, besides tensors, for numpy arrays and scalars in a file:
    numpy's RNG state in our checkpoints (a tuple with a uint32 array), a numpy seed in an MMDetection checkpoint's
    ``meta``. Data, no code."""
    allowed = [np.ndarray, np.dtype] + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')]
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        try:
            core = __import__(module, fromlist=['scalar', '_reconstruct'])
            return allowed + [core.scalar, core._reconstruct]
        except (ImportError, AttributeError):
            continue
    return allowed


_RNG_GLOBALS = numpy_data_globals()


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
    if torch.cuda.is_available():  # this process's GPU only: a resume may see another number of GPUs
        state['cuda'] = torch.cuda.get_rng_state()
    if generator is not None:
        state['generator'] = generator.get_state()
    return state


def set_rng_state(state: Dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    """Restore what :func:`get_rng_state` captured."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # written before 2026-11-25: one state per GPU visible then
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
    if generator is not None and 'generator' in state:
        generator.set_state(state['generator'])


def _unreadable(path: Path, error: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, in a few words (torch's own messages span many lines of advice
    about ``weights_only`` that does not apply here)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(4)
    except OSError as e:
        return f'cannot be read ({e.strerror or e})'
    if not head:
        return 'the file is empty'
    unsafe = re.search(r'GLOBAL ([\w.]+)', str(error))
    if unsafe:  # a readable torch.save file that holds code objects: no checkpoint of this version
        return (f'it holds Python objects other than tensors and numbers ({unsafe.group(1)}), so it is another '
                'kind of file or was written by an older vitzoo')
    if head == b'PK\x03\x04':
        return 'a torch.save archive that is corrupt (truncated or damaged)'
    return 'not a torch.save file (another kind of file, or corrupt)'


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a training checkpoint written by ``vitzoo finetune-det`` (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint {path} not found; give a checkpoint_*.pth written by finetune-det.')
    try:  # weights_only: a checkpoint is data; numpy's RNG state is the only non-torch type it holds
        with torch.serialization.safe_globals(_RNG_GLOBALS):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  truncated, not a torch file, or holding code objects
        raise ValueError(f'{path} is not a readable finetune-det checkpoint: {_unreadable(path, e)}; give the '
                         'checkpoint_last.pth of a finetune-det run.') from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path} is not a finetune-det training checkpoint (it holds a {type(ckpt).__name__}).')
    missing = [k for k in ('model', 'optimizer', 'scheduler', 'epoch', 'step', 'iteration', 'rng') if k not in ckpt]
    if missing and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        last = path.with_name('checkpoint_last.pth')  # a run's model_final.pth lies next to its checkpoint
        raise ValueError(f'{path} holds model weights only (a state dict, like model_final.pth), not a checkpoint to '
                         'resume from (optimizer, schedule, position in the data): resume from '
                         f'{last if last.is_file() else "the checkpoint_last.pth of its run"}.')
    if missing:
        raise ValueError(f'{path} is not a finetune-det training checkpoint (missing {missing}).')
    return ckpt
