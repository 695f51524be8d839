"""The fastest inference path: ``deploy(model)`` returns a fused, eval-mode, no-grad model ready for inference.

Backends (see ``docs/deploy.md`` for measurements and when to use which):

* ``"eager"`` (default): deep copy, ``eval()``, BN/re-param fusion (``timm.utils.reparameterize_model``),
  channels-last memory format for convolutional models, and on CPU (fp32, oneDNN available) a graph rewrite
  that replaces every ``nn.Conv2d`` by a :class:`PackedConv2d`: weights reordered once into oneDNN's blocked
  layout, and a following ReLU and/or residual add fused into the convolution kernel.
* ``"compile"``: the eager model (without the oneDNN rewrite) wrapped in ``torch.compile`` (inductor).
* ``"onnxruntime"``: the fused model exported to ONNX (dynamic batch) and run in an ONNX Runtime session.
* ``"torchscript"``: the eager model (without the oneDNN rewrite) traced and frozen with TorchScript; on CPU with
  oneDNN Graph fusion (``vitzoo.torchscript_backend``) and a convolutional stem run on batch slices
  (``vitzoo.stem_chunking``). The fastest PyTorch path on CPU in our measurements.

Every backend runs its forward under ``torch.inference_mode()`` and converts the input to the memory format
it wants. At deploy time the result is checked against the caller's (unfused) model on ``example_input``;
a max abs diff above ``atol`` (1e-4) raises.
"""
from __future__ import annotations

import copy
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from vitzoo.stem_chunking import chunk_stem

__all__ = ["BACKENDS", "DeployedModel", "PackedConv2d", "available_backends", "deploy", "default_example_input"]

BACKENDS = ("eager", "compile", "onnxruntime", "torchscript")
DEFAULT_ATOL = 1e-4

_RELU_TARGETS = (F.relu, torch.relu, torch.relu_)
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


def available_backends() -> List[str]:
    """The backends usable in this environment."""
    from vitzoo.torchscript_backend import torchscript_available

    backends = ["eager"]
    if hasattr(torch, "compile"):
        backends.append("compile")
    if torchscript_available():
        backends.append("torchscript")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        backends.append("onnxruntime")
    except ImportError:
        pass
    return backends


def missing_backend_hint(backend: str) -> str:
    """What makes ``backend`` usable in an environment where :func:`available_backends` lacks it."""
    if backend == "onnxruntime":
        return "install onnx and onnxruntime (`pip install 'vitzoo[onnx]'`)"
    return "this torch build lacks the features it needs"


class DeployedModel(nn.Module):
    """Inference wrapper: converts the input's memory format and runs the model under ``inference_mode``.

    Before it runs, an image input (the example input was 4-D) is checked against the example input: the rank,
    the channel count, the dtype and, on CUDA, the device; with ``fixed_size`` also the height and width (ONNX
    Runtime, whose exported graph fixes them). A mismatch raises a ``ValueError`` / ``TypeError`` saying what was
    expected and what to do, instead of a backend's own message (oneDNN, TorchScript and ONNX Runtime each word
    these differently, some cryptically).

    Args:
        model: The prepared model (fused, eval, maybe rewritten / compiled / an ONNX Runtime session).
        backend: Name of the backend that built it.
        memory_format: Memory format the input is converted to before ``model`` runs.
        optimizations: Human-readable list of what ``deploy`` applied (for reports and debugging).
        example_input: The input ``deploy`` built and checked the model with; the checks above compare with it.
        fixed_size: Also require the example input's height and width.
    """

    def __init__(
            self,
            model: nn.Module,
            backend: str,
            memory_format: torch.memory_format = torch.contiguous_format,
            optimizations: Sequence[str] = (),
            example_input: Optional[torch.Tensor] = None,
            fixed_size: bool = False,
    ):
        super().__init__()
        self.model = model
        self.backend = backend
        self.memory_format = memory_format
        self.optimizations = list(optimizations)
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        self.example_shape: Optional[Tuple[int, ...]] = None
        self.example_dtype: Optional[torch.dtype] = None
        self.example_device: Optional[torch.device] = None
        self.fixed_size = fixed_size
        if example_input is not None:
            self.set_example(example_input)

    def set_example(self, example_input: torch.Tensor) -> None:
        """Record the input the model was built for (what :meth:`forward` checks its inputs against)."""
        self.example_shape = tuple(example_input.shape)
        self.example_dtype = example_input.dtype
        self.example_device = example_input.device

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error if ``x`` cannot be what this model was deployed for (see the class docstring)."""
        shape = self.example_shape
        if shape is None or len(shape) != 4:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 4:
            hint = " For a single image add the batch dimension with x.unsqueeze(0)." if x.dim() == 3 else ""
            raise ValueError(f"this deployed model takes a 4-D (batch, channels, height, width) tensor like its "
                             f"example input {list(shape)}, got shape {list(x.shape)}.{hint}")
        if x.shape[1] != shape[1]:
            raise ValueError(f"this deployed model takes {shape[1]} input channels (example input {list(shape)}), "
                             f"got {x.shape[1]} channels in shape {list(x.shape)}. Convert the images, or deploy "
                             f"a model built for {x.shape[1]} channels (timm: in_chans={x.shape[1]}).")
        if x.dtype != self.example_dtype:
            raise TypeError(f"this deployed model takes {self.example_dtype} input (its example input's dtype), "
                            f"got {x.dtype}. Convert with x.to({self.example_dtype}), or deploy with an example "
                            f"input of that dtype.")
        if self.example_device is not None and self.example_device.type == "cuda" and x.device != self.example_device:
            raise ValueError(f"this deployed model runs on {self.example_device}, got an input on {x.device}. "
                             f"Move it with x.to('{self.example_device}').")
        if self.fixed_size and tuple(x.shape[2:]) != shape[2:]:
            raise ValueError(f"backend {self.backend!r} was deployed for {shape[2]}x{shape[3]} inputs (the exported "
                             f"graph fixes height and width), got {x.shape[2]}x{x.shape[3]}. Deploy again with an "
                             f"example input of that size (backends 'eager' and 'torchscript' are not tied to the "
                             f"example's size).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        with torch.inference_mode():
            return self.model(x.contiguous(memory_format=self.memory_format))

    def train(self, mode: bool = True) -> "DeployedModel":
        if mode:
            raise RuntimeError("a deployed model is inference-only; deploy() a fresh copy of the original to train.")
        return super().train(False)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, memory_format={self.memory_format}, optimizations={self.optimizations}"


class PackedConv2d(nn.Module):
    """A 2-D convolution run by oneDNN with a pre-packed weight and fused epilogue (CPU, fp32).

    Computes ``unary(conv(x) + residual)`` (residual optional, unary is ``"none"`` or ``"relu"``) with
    ``torch.ops.mkldnn._convolution_pointwise``, the kernel inductor uses on CPU. Packing the weight once
    removes the per-call weight reorder of ``nn.Conv2d``; fusing the ReLU / add removes one pass over the
    activation each. Numerically identical to the unfused ops up to float rounding.

    oneDNN picks the packed layout for one input shape, and a layout chosen for batch 1 can be much slower at
    batch 16 (measured: 1.8x on SHViT's 128->512 1x1 conv at 14x14, 2 threads;
    ``benchmarks/profile_shvit_layers.py --pack-batch 1``). So the weight is packed for
    ``input_size`` at build time and re-packed once for each new input shape seen (the last few are cached).

    A pointwise convolution (1x1, stride 1, no padding, one group) on a channels-last input is a matrix product
    ``(B*H*W, C_in) @ (C_in, C_out)`` on the same memory, so it runs as a oneDNN linear
    (``torch.ops.mkldnn._linear_pointwise``) on that 2-D view and the result is viewed back as a channels-last
    (B, C_out, H, W) tensor: no copies. oneDNN's matmul kernel was faster than its convolution kernel on these
    shapes in our (one-off) measurements.

    Args:
        conv: The convolution to replace (zero padding, float32, CPU).
        input_size: Input shape (B, C, H, W) to pack the weight for first.
    """
    max_cached_shapes = 4

    def __init__(self, conv: nn.Conv2d, input_size: Sequence[int]):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"PackedConv2d supports explicit zero padding only, got {conv}.")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.unary = "none"
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
                          and self.groups == 1)
        # the plain weight is kept (a buffer) so the conv can be re-packed; the packed copies are opaque mkldnn
        # tensors held in a plain dict, so they are not part of state_dict()
        self.register_buffer("weight", conv.weight.detach().clone(), persistent=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._packed: Dict[Tuple[int, ...], torch.Tensor] = {}
        self._packed_for(tuple(input_size))

    def _packed_for(self, shape: Tuple[int, ...]) -> torch.Tensor:
        packed = self._packed.get(shape)
        if packed is None:
            if len(self._packed) >= self.max_cached_shapes:
                self._packed.pop(next(iter(self._packed)))
            if self.pointwise:  # packed for the (B*H*W, C_in) matrix
                rows = shape[0] * shape[2] * shape[3]
                packed = torch.ops.mkldnn._reorder_linear_weight(
                    self.weight.reshape(self.out_channels, self.in_channels), rows)
            else:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(shape))
            self._packed[shape] = packed
        return packed

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self._packed_for(tuple(x.shape))
        if self.pointwise:
            return self._pointwise(x, weight, residual)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, self.bias, self.padding, self.stride, self.dilation, self.groups, self.unary, [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, None if self.unary == "none" else self.unary, [], None)

    def _pointwise(self, x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        batch, _, height, width = x.shape
        # (B, C, H, W) channels-last -> (B*H*W, C): a view; any other layout is copied by reshape
        rows = x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)
        if residual is None:
            out = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, self.unary, [], "")
        else:
            other = residual.permute(0, 2, 3, 1).reshape(-1, self.out_channels)
            out = torch.ops.mkldnn._linear_pointwise.binary(rows, other, weight, self.bias, "add")
            if self.unary == "relu":  # the linear kernel takes no unary op after the add
                out = out.relu_()
        return out.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, unary={self.unary!r}"
                + (", as linear" if self.pointwise else ""))


def default_example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A random input of the model's ``pretrained_cfg['input_size']``, on the model's device and dtype."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    input_size = cfg.get("input_size")
    if not input_size:
        raise ValueError(
            f"{type(model).__name__} has no pretrained_cfg['input_size']; pass example_input=torch.randn(1, 3, H, W)."
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch_size, *input_size, device=device, dtype=dtype)


def is_convolutional(model: nn.Module) -> bool:
    """True when the model has convolutions beyond a single patch embedding (then channels-last pays off)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def _is_relu(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_TARGETS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _add_operands(node: fx.Node) -> List[Tuple[object, object]]:
    """For a plain 2-operand add node: the (branch, residual) orders it may be fused in, else ``[]``.

    An in-place ``a.add_(b)`` may only be fused with ``a`` as the convolution output (``b`` must stay intact).
    """
    if len(node.args) != 2 or node.kwargs:
        return []
    a, b = node.args
    if node.op == "call_function" and node.target in _ADD_TARGETS or node.op == "call_method" and node.target == "add":
        return [(a, b), (b, a)]
    if node.op == "call_method" and node.target == "add_":
        return [(a, b)]
    return []


def _same_tensor_meta(a: fx.Node, b: object) -> bool:
    if not isinstance(b, fx.Node):
        return False
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return ma is not None and mb is not None and getattr(mb, "shape", None) == ma.shape and mb.dtype == ma.dtype


def _drop_identities(gm: fx.GraphModule, modules: Dict[str, nn.Module]) -> None:
    """Bypass ``nn.Identity`` calls (e.g. disabled drop-path) so that conv -> add patterns become adjacent."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _pack_convolutions(gm: fx.GraphModule, modules: Dict[str, nn.Module]) -> Dict[fx.Node, PackedConv2d]:
    """Replace every call of an ``nn.Conv2d`` module by a fresh :class:`PackedConv2d` submodule."""
    packed: Dict[fx.Node, PackedConv2d] = {}
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            continue
        input_meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
        if input_meta is None or len(node.args) != 1 or node.kwargs:
            continue
        name = f"packed_{len(packed)}"
        gm.add_submodule(name, PackedConv2d(conv, input_meta.shape))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        packed[new] = gm.get_submodule(name)
    return packed


def _fuse_residual_adds(gm: fx.GraphModule, packed: Dict[fx.Node, PackedConv2d]) -> int:
    """``conv(x) + r`` (same shape, conv used only by the add) -> ``PackedConv2d(x, r)``."""
    fused = 0
    for node in list(gm.graph.nodes):
        for conv_node, residual in _add_operands(node):
            if conv_node in packed and len(conv_node.users) == 1 and len(conv_node.args) == 1 \
                    and packed[conv_node].unary == "none" and _same_tensor_meta(conv_node, residual):
                # the residual may be computed after the conv (``y = conv(x); r = f(x); y + r``): run the conv
                # where the add was, after both operands (its only user is the add, so nothing earlier needs it)
                node.prepend(conv_node)
                conv_node.args = (conv_node.args[0], residual)
                # the add's output shape/dtype equal the conv's, so conv_node's meta stays valid
                node.replace_all_uses_with(conv_node)
                gm.graph.erase_node(node)
                fused += 1
                break
    return fused


def _fuse_relus(gm: fx.GraphModule, packed: Dict[fx.Node, PackedConv2d], modules: Dict[str, nn.Module]) -> int:
    """``relu(PackedConv2d(...))`` with the conv used only by the relu -> unary relu inside the conv."""
    fused = 0
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules):
            continue
        source = node.args[0] if node.args else None
        if source in packed and len(source.users) == 1 and packed[source].unary == "none":
            packed[source].unary = "relu"
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            fused += 1
    return fused


def onednn_rewrite(model: nn.Module, example_input: torch.Tensor) -> Tuple[nn.Module, List[str]]:
    """Trace ``model`` with torch.fx and swap its convolutions for fused, pre-packed oneDNN ones.

    Args:
        model: An eval-mode, fused, fp32 CPU model (not modified).
        example_input: Input used to record shapes (its memory format should be the one used at inference).

    Returns:
        The rewritten ``fx.GraphModule`` and a list describing what was done. If the model cannot be traced
        or has no plain convolutions, the model is returned unchanged with an explanation.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # tracing arbitrary user models can fail in many ways
        return model, [f"oneDNN rewrite skipped: torch.fx could not trace the model ({type(e).__name__}: {e})"]
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    packed = _pack_convolutions(gm, modules)
    if not packed:
        return model, ["oneDNN rewrite skipped: no plain nn.Conv2d found"]
    n_add = _fuse_residual_adds(gm, packed)
    n_relu = _fuse_relus(gm, packed, modules)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    return gm, [f"oneDNN pre-packed convolutions: {len(packed)} (fused ReLU: {n_relu}, fused residual add: {n_add})"]


#: A diff this small relative to the largest output is float rounding, not a wrong rewrite (fp32 eps: 1.2e-7).
ROUNDING_RTOL = 1e-5


def _check_close(reference: torch.Tensor, candidate: nn.Module, example_input: torch.Tensor, atol: float,
                 rtol: float, backend: str) -> float:
    with torch.no_grad():
        output = candidate(example_input)
    diff = (reference - output.to(reference.device, reference.dtype)).abs().max().item()
    scale = reference.abs().max().item()
    tolerance = atol + rtol * scale
    if not diff <= tolerance:
        if diff <= ROUNDING_RTOL * scale:  # e.g. randomly initialised MobileOne: outputs of 1e15 differ by 1e9
            hint = (f"The original's outputs reach {scale:.3g}, so this is float rounding at that scale (relative "
                    f"diff {diff / scale:.2g}); with such outputs (random weights?) pass a larger atol, e.g. "
                    f"atol={diff * 2:.2g}, or rtol={ROUNDING_RTOL:g}, or deploy the model with its trained weights.")
        else:
            hint = "Use another backend, or report this with the model name."
        raise RuntimeError(
            f"deploy(backend={backend!r}): output differs from the original model by max abs diff {diff:.3g} "
            f"(> tolerance {tolerance:g}). {hint}"
        )
    return diff


def pad_attention_head_dims(model: nn.Module) -> int:
    """Switch on ``pad_head_dims`` in attention layers whose q/k and v head widths differ (NViT / ReViT).

    PyTorch's fused attention kernels need equal widths; zero-padding is exact. Returns the number of layers.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "pad_head_dims") and module.qk_dim != module.v_dim:
            module.pad_head_dims = True
            count += 1
    return count


def use_nhwc_attention(model: nn.Module) -> int:
    """Switch on ``nhwc`` in attention layers that have it (SHViT's SHSA): attention on the channels-last token view.

    Same maths, no layout copies for channels-last inputs (float rounding differs by ~1e-7). Returns the number of
    layers switched.
    """
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "nhwc", None), bool):
            module.nhwc = True
            count += 1
    return count


def _build_eager(model: nn.Module, example_input: torch.Tensor, rewrite: bool) -> DeployedModel:
    optimizations = ["eval", "fused (timm.utils.reparameterize_model)"]
    padded = pad_attention_head_dims(model)
    if padded:
        optimizations.append(f"q/k/v zero-padded to equal head widths in {padded} attention layers (fused SDPA)")
    memory_format = torch.contiguous_format
    if is_convolutional(model):
        memory_format = torch.channels_last
        model = model.to(memory_format=torch.channels_last)
        optimizations.append("channels_last")
        nhwc = use_nhwc_attention(model)
        if nhwc:
            optimizations.append(f"attention on the channels-last token view in {nhwc} layers")
    cpu_fp32 = example_input.device.type == "cpu" and example_input.dtype == torch.float32
    if rewrite and memory_format == torch.channels_last and cpu_fp32 and torch.backends.mkldnn.is_available():
        model, notes = onednn_rewrite(model, example_input.contiguous(memory_format=memory_format))
        optimizations.extend(notes)
    return DeployedModel(model, "eager", memory_format, optimizations)


def _build_compile(model: nn.Module, example_input: torch.Tensor) -> DeployedModel:
    deployed = _build_eager(model, example_input, rewrite=False)
    deployed.model = torch.compile(deployed.model, options={"freezing": True})
    deployed.backend = "compile"
    deployed.optimizations.append("torch.compile(inductor, freezing=True)")
    return deployed


def _build_torchscript(model: nn.Module, example_input: torch.Tensor) -> DeployedModel:
    from vitzoo.torchscript_backend import build

    deployed = _build_eager(model, example_input, rewrite=False)
    example = example_input.contiguous(memory_format=deployed.memory_format)
    if example.device.type == "cpu":
        size = chunk_stem(deployed.model, example)
        if size is not None:
            deployed.optimizations.append(f"stem run on slices of {size} images (keeps its activations in cache)")
    deployed.model, notes = build(deployed.model, example)
    deployed.backend = "torchscript"
    deployed.optimizations.extend(notes)
    return deployed


def _build_onnxruntime(model: nn.Module, example_input: torch.Tensor, opset: int) -> DeployedModel:
    from vitzoo.onnx_runtime import OnnxRuntimeModule, export_onnx

    notes = ["eval", "fused (timm.utils.reparameterize_model)"]
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:  # e.g. a bf16 model: ONNX Runtime's CPU kernels run fp32
        model = model.float()
        notes.append(f"exported in float32 (the model was {', '.join(sorted(map(str, dtypes)))})")
    session = OnnxRuntimeModule(export_onnx(model.cpu(), example_input.float().cpu(), opset=opset))
    notes += [f"ONNX opset {opset}, dynamic batch", f"ONNX Runtime CPU, {session.num_threads} threads"]
    return DeployedModel(session, "onnxruntime", torch.contiguous_format, notes, fixed_size=True)


def deploy(
        model: nn.Module,
        example_input: Optional[torch.Tensor] = None,
        backend: str = "eager",
        inplace: bool = False,
        verify: bool = True,
        atol: float = DEFAULT_ATOL,
        rtol: float = 0.0,
        opset: int = 17,
) -> DeployedModel:
    """Return ``model`` prepared for fast inference.

    Args:
        model: Any image model (timm or plain ``nn.Module``) taking a (B, C, H, W) tensor.
        example_input: Input used for tracing, export and verification; default: a random batch-1 tensor of
            the model's ``pretrained_cfg['input_size']``.
        backend: One of ``BACKENDS``: ``"eager"``, ``"compile"``, ``"onnxruntime"``, ``"torchscript"``.
        inplace: Fuse the caller's model in place instead of a deep copy (saves memory; the original is
            then changed).
        verify: Compare the deployed model's output with the original model's on ``example_input``.
        atol: Largest allowed max abs difference in that check.
        rtol: Added to ``atol`` in units of the original's largest output magnitude (default 0: an absolute
            check); e.g. ``ROUNDING_RTOL`` for models with random weights, whose outputs can be huge.
        opset: ONNX opset for the ``"onnxruntime"`` backend (>= 17).

    Returns:
        A :class:`DeployedModel` (an ``nn.Module``) whose forward runs without autograd.

    Raises:
        ValueError: Unknown backend, or no example input and no ``pretrained_cfg``.
        RuntimeError: Backend unavailable here, or the deployed output differs by more than
            ``atol + rtol * max|original output|``.
    """
    from timm.utils import reparameterize_model

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}.")
    if backend not in available_backends():
        raise RuntimeError(f"backend {backend!r} is not available here (available: "
                           f"{', '.join(available_backends())}); {missing_backend_hint(backend)}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy() expects an nn.Module, got {type(model).__name__}.")
    if example_input is None:
        example_input = default_example_input(model)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    reference = None
    if verify:
        with torch.no_grad():
            reference = model(example_input)
    model = reparameterize_model(model, inplace=True)
    model.requires_grad_(False)
    builders: Dict[str, Callable[[], DeployedModel]] = {
        "eager": lambda: _build_eager(model, example_input, rewrite=True),
        "compile": lambda: _build_compile(model, example_input),
        "onnxruntime": lambda: _build_onnxruntime(model, example_input, opset),
        "torchscript": lambda: _build_torchscript(model, example_input),
    }
    deployed = builders[backend]()
    deployed.set_example(example_input)
    if verify:
        diff = _check_close(reference, deployed, example_input, atol, rtol, backend)
        deployed.optimizations.append(f"verified: max abs diff {diff:.2g} vs original")
    return deployed
