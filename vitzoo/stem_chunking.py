"""Run a convolutional stem on slices of the batch, so that its large activations stay in the CPU's cache.

A patchify stem such as SHViT's (four stride-2 3x3 convolutions, 224 -> 14) produces its largest activations in
its first layers: for SHViT-S1 at 224x224 the first convolution writes 0.8 MB per image, 12.8 MB for a batch of
16, which the second convolution then reads back from main memory. Run on a few images at a time, the same
layers read what the previous one has just written while it is still in cache; the stem's output is small (100 KB
per image for S1), so concatenating the slices costs little. Same maths; oneDNN may pick another kernel
blocking for the slice's batch size, so results can differ by float rounding (~1e-7).

``vitzoo.deploy(backend="torchscript")`` applies this (:func:`chunk_stem`): +0-5% on whole SHViT, EfficientViT-M
and FastViT models at batch 16 on the 2-vCPU machine of ``docs/benchmarks.md`` (section 2,
``benchmarks/bench_stem_chunking.py``). It is not applied to the ``eager`` backend: its torch.fx rewrite would
have to pack the stem's convolutions separately, and in one-off measurements that stayed within noise.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import nn

from vitzoo.outputs import outputs_close

__all__ = ["BatchChunked", "STEM_ATTRIBUTES", "chunk_stem", "find_stem", "stem_chunk_size"]

#: Largest activation one slice of the stem may write, in bytes: about twice a Zen 4 / recent Xeon core's L2.
CHUNK_BUDGET_BYTES = 2 * 1024 * 1024
#: Names under which timm-style models keep their stem.
STEM_ATTRIBUTES: Tuple[str, ...] = ("patch_embed", "stem")
#: A stem is worth slicing only when its largest activation is this many times its output (per image).
MIN_PEAK_TO_OUTPUT = 4


#: Attributes of the stem that :class:`BatchChunked` does not pass through: the fusion steps, which must reach the
#: stem itself (``reparameterize`` recurses into the wrapper's children).
_NOT_PASSED_THROUGH = frozenset({"fuse", "reparameterize", "switch_to_deploy"})


class BatchChunked(nn.Module):
    """Runs ``module`` on slices of at most ``chunk_size`` samples of the batch and concatenates the results.

    Args:
        module: A module whose samples are independent (no batch statistics: eval mode).
        chunk_size: Samples per slice (>= 1).
    """

    def __init__(self, module: nn.Module, chunk_size: int):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        self.module = module
        self.chunk_size = int(chunk_size)

    def __getattr__(self, name: str) -> Any:
        """The stem's own attributes read through the wrapper (found by an audit: timm's ViTs read
        ``patch_embed.grid_size`` in their forward, which failed on a hybrid ViT's chunked stem)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            # not Python's protocols (deepcopy found the stem's __deepcopy__) nor the fusion methods (reparameterize
            # would replace the wrapper by the fused stem; found by a review): those are the wrapper's own
            if name.startswith("__") or name in _NOT_PASSED_THROUGH:
                raise
            return getattr(super().__getattr__("module"), name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:  # a stem called with more than the batch: as the model calls it, unsliced
            return self.module(x, *args, **kwargs)
        parts = x.split(self.chunk_size)  # a list: its length is a Python int, also under torch.jit.trace
        if len(parts) == 1:
            return self.module(x)
        return torch.cat([self.module(part) for part in parts], dim=0)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"


def find_stem(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """``(attribute, module)`` of the model's stem when it is a stack of two or more convolutions, else None.

    Only the attributes in :data:`STEM_ATTRIBUTES` are looked at; a ViT's single-convolution patch embedding does
    not qualify (nothing to keep in cache between layers).
    """
    for name in STEM_ATTRIBUTES:
        stem = getattr(model, name, None)
        if isinstance(stem, nn.Module) and not isinstance(stem, BatchChunked):
            if sum(isinstance(m, nn.Conv2d) for m in stem.modules()) >= 2:
                return name, stem
    return None


def _activation_bytes(stem: nn.Module, sample: torch.Tensor) -> Tuple[int, int]:
    """Largest convolution output and the stem's output, in bytes, for one sample ((0, 0): output not a tensor)."""
    sizes: List[int] = []

    def record(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        sizes.append(output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in stem.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            out = stem(sample)
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(out, torch.Tensor):  # a stem returning a tuple/dict cannot be concatenated by slices
        return 0, 0
    return max(sizes, default=0), out.numel() * out.element_size()


def stem_chunk_size(stem: nn.Module, sample: torch.Tensor, budget: int = CHUNK_BUDGET_BYTES) -> Optional[int]:
    """Samples per slice for ``stem`` (None: not worth slicing), from one sample ``sample`` of shape (1, C, H, W).

    The slice is as large as fits ``budget`` bytes of the stem's largest activation (at least one sample); a stem
    whose largest activation is less than :data:`MIN_PEAK_TO_OUTPUT` times its output is left alone.
    """
    peak, out = _activation_bytes(stem, sample)
    if peak == 0 or peak < MIN_PEAK_TO_OUTPUT * out:
        return None
    return max(1, budget // peak)


def chunk_stem(model: nn.Module, example_input: torch.Tensor, budget: int = CHUNK_BUDGET_BYTES) -> Optional[int]:
    """Wrap ``model``'s convolutional stem (:func:`find_stem`) in :class:`BatchChunked`, in place.

    Does nothing (returns None) when the model has no such stem or the stem is not worth slicing; returns the
    slice size otherwise. The slice size depends only on one sample of ``example_input``: batches no larger than
    one slice run unsliced, so the wrapper may stay in place for any batch size.
    """
    found = find_stem(model)
    if found is None or example_input.dim() != 4:
        return None
    name, stem = found
    try:
        size = stem_chunk_size(stem, example_input[:1], budget)
    except Exception:  # noqa: BLE001  a stem the model calls otherwise (another argument, a check that fails on
        # one image; found by an audit: TypeError / ValueError escaped deploy): leave it be
        return None
    if size is None or not _samples_independent(stem, example_input, size):
        return None
    setattr(model, name, BatchChunked(stem, size))
    try:  # the model as a whole must still run: one that iterates over or indexes its stem cannot take the wrapper
        with torch.no_grad():
            model(example_input.clone())
    except Exception:  # noqa: BLE001  found by an audit: deploy failed, blamed on tracing
        setattr(model, name, stem)
        return None
    return size


def _samples_independent(stem: nn.Module, example_input: torch.Tensor, size: int) -> bool:
    """Whether the stem gives the same output on slices of ``size`` samples as on the whole batch.

    Not so for a stem that mixes samples, e.g. a BatchNorm without running statistics (batch statistics in eval
    mode too). Checked on ``size + 1`` distinct random samples (identical ones would hide batch statistics),
    scaled like the example.
    """
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((size + 1, *example_input.shape[1:]), generator=generator, dtype=torch.float32)
    probe = probe.to(example_input.device) * example_input.float().std() + example_input.float().mean()
    probe = probe.to(example_input.dtype)
    probe = probe.contiguous(memory_format=torch.channels_last) \
        if example_input.is_contiguous(memory_format=torch.channels_last) else probe
    with torch.no_grad():
        try:
            whole, sliced = stem(probe), BatchChunked(stem, size)(probe)
        except Exception:  # noqa: BLE001  as in chunk_stem
            return False
    return outputs_close(sliced, whole, rel=1e-3)
