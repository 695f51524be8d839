"""Switching off PyTorch's fused ``nn.MultiheadAttention`` fast path for a block of code.

Without grad and in eval mode, ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` run one fused op
(``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``). FLOP counting has no handle for
it and the ONNX exporter cannot write it; with the fast path off the same modules run their projections and
attention as ordinary ops, with the same results.
"""
import contextlib
from typing import Iterator

import torch

__all__ = ["mha_fastpath_off"]


@contextlib.contextmanager
def mha_fastpath_off() -> Iterator[None]:
    """Run the block with ``torch.backends.mha``'s fast path off (a no-op on a torch without the switch), and
    restore the setting afterwards."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)
