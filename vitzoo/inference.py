"""The fastest inference path: ``deploy(model)`` returns a fused, eval-mode, no-grad model ready for inference.

Backends (see ``docs/deploy.md`` for measurements and when to use which):

* ``"eager"`` (default): deep copy, ``eval()``, BN/re-param fusion (the modules' ``fuse()`` / ``reparameterize()``
  as ``timm.utils.reparameterize_model`` calls them, weight-standardised convolutions made plain by
  ``vitzoo.weight_standardisation``, then ``vitzoo.batchnorm_folding`` for plain Conv->BN pairs),
  channels-last memory format for convolutional models, and on CPU (fp32, oneDNN available) a graph rewrite
  that replaces every ``nn.Conv2d`` by a :class:`~vitzoo.onednn_rewrite.PackedConv2d`: weights reordered once
  into oneDNN's blocked layout, and a following ReLU and/or residual add fused into the convolution kernel
  (``vitzoo.onednn_rewrite``). On CPUs with AMX, most convolutions and linear layers then run in split bf16 on the
  AMX tile unit (``fp32_precision="bf16x3"``, the default; ``vitzoo.amx_gemm``): the fastest path measured there.
* ``"compile"``: the eager model (without the oneDNN rewrite) wrapped in ``torch.compile`` (inductor).
* ``"onnxruntime"``: the fused model exported to ONNX (dynamic batch) and run in an ONNX Runtime session.
* ``"torchscript"``: the eager model (without the oneDNN rewrite) traced and frozen with TorchScript; on CPU with
  oneDNN Graph fusion (``vitzoo.torchscript_backend``) and a convolutional stem run on batch slices
  (``vitzoo.stem_chunking``). The fastest IEEE fp32 PyTorch path on CPU in our measurements.

Every backend runs its forward under ``torch.inference_mode()`` and converts the input to the memory format
it wants. At deploy time the result is checked against the caller's (unfused) model on ``example_input``;
a max abs diff above ``atol`` (1e-4) raises. A module with forward hooks is kept as it is, so that its hooks run
(``vitzoo.module_hooks``).
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from vitzoo import amx_gemm
from vitzoo.amx_linear import AmxLinear, classify_rows, images_in_call, restore_linears, swap_linears
from vitzoo.batchnorm_folding import fold_batchnorms
from vitzoo.module_hooks import deepcopy_keeping_modes, deepcopy_sharing_hooks, hook_ids, lost_hooks, reparameterize
from vitzoo.models import _first_conv_in_chans, first_meta_tensor, model_in_chans, model_input_size
from vitzoo.onednn_rewrite import FP32_PRECISIONS, PackedConv2d, onednn_rewrite
from vitzoo.outputs import (WRONG_RESULT_RTOL, OutputLayout, UnsupportedOutputError, check_comparable,
                            max_abs_diff_of)
from vitzoo.shsa_kernel import swap_attention
from vitzoo.stem_chunking import chunk_stem
from vitzoo.weight_standardisation import standardise_weights

__all__ = ["BACKENDS", "DeployedModel", "PackedConv2d", "available_backends", "deploy", "default_example_input"]

BACKENDS = ("eager", "compile", "onnxruntime", "torchscript")
DEFAULT_ATOL = 1e-4


#: The first step of every backend, as ``optimizations`` lists it
FUSED = "fused (each module's fuse() / reparameterize(), as timm.utils.reparameterize_model; hooked modules kept)"


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
        return "install onnx and onnxruntime (`pip install onnx onnxruntime`)"
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

    @property
    def fp32_precision(self) -> str:
        """``"bf16x3"`` if some convolution or linear layer runs in split bf16 on AMX (see :mod:`vitzoo.amx_gemm`),
        else ``"ieee"``."""
        uses_amx = any(isinstance(m, AmxLinear) or isinstance(m, PackedConv2d) and m.amx
                       for m in self.model.modules()) if isinstance(self.model, nn.Module) else False
        return "bf16x3" if uses_amx else "ieee"

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
        if x.device.type == "meta":
            raise ValueError("got an input on the 'meta' device, which holds no values to run on; pass a real "
                             f"tensor on {self.example_device or 'the CPU'}.")
        if self.example_device is not None and x.device != self.example_device:
            # found by an audit: a CUDA input to a CPU-deployed model got a kernel's words (eager) or was moved to
            # the CPU without a word (onnxruntime)
            raise ValueError(f"this deployed model runs on {self.example_device}, got an input on {x.device}. "
                             f"Move it with x.to('{self.example_device}'), or deploy with an example input on "
                             f"{x.device}.")
        if self.fixed_size and tuple(x.shape[2:]) != shape[2:]:
            raise ValueError(f"backend {self.backend!r} was deployed for {shape[2]}x{shape[3]} inputs (the exported "
                             f"graph fixes height and width), got {x.shape[2]}x{x.shape[3]}. Deploy again with an "
                             f"example input of that size (backends 'eager' and 'torchscript' are not tied to the "
                             f"example's size).")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), images_in_call(x.shape[0]):
            try:
                if isinstance(self.model, torch.fx.GraphModule):
                    # not through torch.fx's call wrapper, which prints the generated code of a failing line to
                    # stderr before re-raising (also when the caller catches the error)
                    return nn.Module.__call__(self.model, x)
                return self.model(x)
            except Exception as e:  # noqa: BLE001  re-raised below unless the model itself rejects the input
                self._raise_models_own_error(x, e)
                raise

    def _raise_models_own_error(self, x: torch.Tensor, error: Exception) -> None:
        """Under ``torch.compile`` a model's own error (a ViT given another size) arrives wrapped in a ~20-line
        Dynamo report; run the model uncompiled once and raise its error instead, if it has one."""
        original = getattr(self.model, "_orig_mod", None)
        dynamo_error = getattr(getattr(torch, "_dynamo", None), "exc", None)
        if original is None or dynamo_error is None or not isinstance(error, dynamo_error.TorchDynamoException):
            return
        try:
            original(x)
        except Exception as own:  # noqa: BLE001  the model's own error, as eager would raise it
            raise own from None

    def train(self, mode: bool = True) -> "DeployedModel":
        if mode:
            raise RuntimeError("a deployed model is inference-only; deploy() a fresh copy of the original to train.")
        return super().train(False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001  nn.Module's signature
        """``.to()``, ``.double()``, ``.half()``, ``.cuda()``, ...: refused where they would change the dtype or
        device, which the deployed graphs, packed weights and sessions are fixed to (before 2026-11-25 a
        ``torchscript`` model returned wrong numbers after ``.double()``, found by an audit); a no-op (``.to()`` the
        device and dtype it runs in) passes."""
        probe = torch.empty(0, dtype=self.example_dtype or torch.float32, device=self.example_device or "cpu")
        moved = fn(probe)
        if moved.dtype != probe.dtype or moved.device != probe.device:
            raise self._cannot(f"moved from {probe.dtype} on {probe.device} to {moved.dtype} on {moved.device}")
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Refused: the backends run packed weights, traced constants or an ONNX Runtime session made from the
        weights at deploy time, which loading does not change (found by an audit: "All keys matched successfully",
        and the outputs kept the old weights, in part or in whole)."""
        raise self._cannot_load()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise self._cannot_load()  # a module holding this one loading its state dict (found in review)

    def _cannot_load(self) -> TypeError:
        return TypeError(f"a model deployed by vitzoo.deploy (backend {self.backend!r}) cannot load new weights: its "
                         "weights were packed, traced or exported when it was deployed. Load them into the original "
                         "model and deploy() it again.")

    def _cannot(self, what: str) -> TypeError:
        return TypeError(f"a model deployed by vitzoo.deploy (backend {self.backend!r}) cannot be {what}: save or "
                         "copy the original model and deploy() it again where it runs, or write an ONNX file with "
                         "vitzoo.export.export_verified_onnx (`vitzoo export`).")

    def __getstate__(self):
        # pickling is what torch.save does; the backends' own errors ("Cannot access storage of OpaqueTensorImpl",
        # "cannot pickle InferenceSession", "Tried to serialize object __torch__...") would not say what to do
        raise self._cannot("saved or pickled" if self._copyable() else "saved, pickled or deep-copied")

    def _copyable(self) -> bool:
        """Whether ``copy.deepcopy`` works: not for an ONNX Runtime session or oneDNN-packed weights (no storage)."""
        return self.backend != "onnxruntime" and not any(isinstance(m, PackedConv2d) for m in self.modules())

    def __copy__(self) -> "DeployedModel":
        """A shallow copy, sharing the deployed modules, as ``copy.copy`` of any module (found by a review: it went
        through pickling and said the model "cannot be saved or pickled")."""
        copied = type(self).__new__(type(self))
        copied.__dict__.update(self.__dict__)
        return copied

    def __deepcopy__(self, memo: dict) -> "DeployedModel":
        if not self._copyable():
            raise self._cannot("saved, pickled or deep-copied")
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, memory_format={self.memory_format}, optimizations={self.optimizations}"


def default_example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    """A random input of the model's ``pretrained_cfg['input_size']`` (with its own ``in_chans``), on the model's
    device and dtype."""
    input_size = model_input_size(model)
    if not input_size:
        chans = model_in_chans(model)
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; pass "
                         f"example_input=torch.randn(1, {chans}, H, W).")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.randn(batch_size, *input_size, device=device, dtype=dtype)


def check_materialised(model: nn.Module, caller: str) -> None:
    """Refuse a model with tensors on the ``meta`` device (built without its weights): it has no values to run."""
    meta = first_meta_tensor(model)
    if meta is not None:
        raise ValueError(
            f"{caller}: the model's {meta} is on the 'meta' device: the model is not materialised "
            "(built under torch.device('meta') or with empty weights), so it holds no values to run or "
            "check. Materialise it first: model.to_empty(device='cpu') then model.load_state_dict(weights), "
            "or build it with its weights (e.g. timm.create_model(name, pretrained=True)).")


def _check_example_is_a_batch(example_input: object) -> None:
    """``example_input`` must be one tensor holding at least one image: deploy traces, exports and checks on it."""
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() and example_input.shape[0] == 0:
            one = [1, *example_input.shape[1:]]
            raise ValueError(
                f"deploy(): example_input has batch size 0 (shape {list(example_input.shape)}); it must hold at "
                "least one image (batch >= 1): the deployed model is checked against the original on it, and an "
                f"empty output would pass any check. Pass e.g. torch.randn({', '.join(map(str, one))}).")
        return
    if type(example_input).__module__ == "numpy":
        hint = "convert a numpy array with torch.from_numpy(array)"
    elif isinstance(example_input, (list, tuple)):
        hint = ("stack a list of images into one batch with torch.stack(images); a model taking several inputs "
                "cannot be deployed (the deployed model's forward takes one tensor)")
    else:
        hint = "e.g. torch.randn(1, 3, 224, 224)"
    raise TypeError(f"deploy(): example_input must be a torch.Tensor, one (B, C, H, W) batch, got "
                    f"{type(example_input).__name__}: {hint}.")


def _check_example_dtype(model: nn.Module, example_input: torch.Tensor) -> None:
    """A float example of another dtype than the model's weights would fail inside the first layer; say so here.
    So would an integer (uint8 image) example, and a ``meta`` one, which holds no values to check against."""
    if not isinstance(example_input, torch.Tensor):
        return
    if example_input.device.type == "meta":
        raise ValueError("deploy(): example_input is on the 'meta' device, which holds no values to trace, export "
                         "or check with; pass a real tensor (e.g. torch.randn(1, 3, 224, 224)).")
    if not example_input.is_floating_point() and not example_input.is_complex():
        raise TypeError(f"deploy(): example_input is {example_input.dtype}; image models take float input: pass "
                        "example_input.float() (normalised as the model expects, e.g. with timm's transforms).")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1 and example_input.dtype not in dtypes:
        (dtype,) = dtypes
        raise TypeError(
            f"deploy(): example_input is {example_input.dtype} but the model's weights are {dtype}; pass "
            f"example_input.to({dtype}) (or convert the model with model.to({example_input.dtype})).")


def _check_example_values(example_input: torch.Tensor) -> None:
    """NaN in the example leaves nothing to check the deployed model with (found by a review: ``torch.empty``'s
    uninitialised memory gave "output differs ... by max abs diff nan ... report this with the model name")."""
    nan = int(torch.isnan(example_input).sum()) if example_input.is_floating_point() else 0
    if nan:
        shape = ", ".join(map(str, example_input.shape))
        raise ValueError(
            f"deploy(): example_input holds {nan} NaN value(s) of {example_input.numel()} (uninitialised memory, "
            f"such as torch.empty's?); deploy() traces the model and checks its outputs on it. Pass real or random "
            f"values, e.g. torch.randn({shape}).")


def _check_reference_values(reference: object) -> None:
    """The original model's own output must be free of NaN for the check to mean anything."""
    nan = sum(int(torch.isnan(t).sum()) for t in pytree.tree_leaves(reference)
              if isinstance(t, torch.Tensor) and t.is_floating_point())
    if nan:
        raise ValueError(
            f"deploy(): the original model's output on example_input holds {nan} NaN value(s), so no deployed "
            "model can be checked against it: check the model (a NaN or overflowing weight?) and the example's "
            "values, or pass verify=False to deploy without checking.")


def _check_example_channels(model: nn.Module, example_input: torch.Tensor) -> None:
    """An image example of another channel count than the model's ``in_chans`` (timm models record it) would fail
    in the first layer with torch's shape message; say which channels and what to do (found by a sweep)."""
    chans = getattr(model, "in_chans", None)
    if isinstance(chans, int) and chans > 0 and example_input.dim() == 4 and example_input.shape[1] != chans \
            and _first_conv_in_chans(model) != example_input.shape[1]:  # a first conv replaced by hand: its own
        shape = list(example_input.shape)
        raise ValueError(
            f"deploy(): example_input has {shape[1]} channels (shape {shape}), but the model takes {chans} (its "
            f"in_chans). Pass an example like the images it will run on, e.g. torch.randn(1, {chans}, {shape[2]}, "
            f"{shape[3]}), or create the model for {shape[1]}-channel images (timm: in_chans={shape[1]}).")


def is_convolutional(model: nn.Module) -> bool:
    """True when the model has plain convolutions beyond a single patch embedding, and at least as many as other
    ``nn.Conv2d`` kinds (then channels-last pays off).

    Not for a model holding a 5-D or larger tensor (an ``nn.Conv3d``, as in timm's lambda layers):
    ``model.to(memory_format=torch.channels_last)`` refuses those, so such a model keeps its own format. Not for one
    whose convolutions are mostly of other kinds, which the oneDNN rewrite leaves alone: weight-standardised ones
    (NFNet's ``ScaledStdConv2d``, BiT's ``StdConv2d``) ran slower in channels-last (nf_resnet26 0.86x, found by a
    sweep; ``benchmarks/bench_other_convs.py``). :func:`deploy` makes those plain first
    (:mod:`vitzoo.weight_standardisation`); the rule still holds for hooked ones and other kinds.
    """
    if any(t.dim() > 4 for t in (*model.parameters(), *model.buffers())):
        return False
    convs = [type(m) is nn.Conv2d for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(convs) > 1 and 2 * sum(convs) >= len(convs)


#: A diff this small relative to the largest output is float rounding, not a wrong rewrite (fp32 eps: 1.2e-7).
ROUNDING_RTOL = 1e-5
#: The same for bf16 / fp16 models (bf16 eps: 7.8e-3; errors add up over the layers).
_HALF_RTOL = 5e-2


@contextlib.contextmanager
def full_fp32_precision(device: torch.device) -> Iterator[None]:
    """On CUDA: convolutions and matrix products in IEEE fp32 (TF32 off) while :func:`deploy` checks its result.

    cuDNN runs fp32 convolutions in TF32 (10-bit mantissa) by default, so on Ampere and later GPUs the original and
    the fused model round differently by ~1e-3 of the output, far above the 1e-4 the check holds the rewrite to.
    The check is about the rewrite, not the GPU's precision setting, which applies to the deployed model as it does
    to the original; the settings are restored afterwards. Elsewhere a no-op.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
        flags = [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
        exact = "ieee"
    else:
        flags, exact = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")], False
    saved = [getattr(owner, name) for owner, name in flags]
    try:
        for owner, name in flags:
            setattr(owner, name, exact)
        yield
    finally:
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)


def _check_not_cuda_for_onnxruntime(model: nn.Module, example_input: torch.Tensor) -> None:
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())} | {example_input.device.type}
    if devices - {"cpu"}:
        raise ValueError(
            f"backend 'onnxruntime' runs ONNX Runtime's CPU execution provider, but the model or the example input "
            f"is on {', '.join(sorted(devices - {'cpu'}))}: deploy a CPU model with a CPU example input "
            f"(model.cpu(), example_input.cpu()), or use backend 'eager', 'compile' or 'torchscript' on the GPU.")


def _rounding_sensitivity(model: nn.Module, example_input: torch.Tensor) -> float:
    """How far ``model``'s output moves when every input value moves by one float32 rounding step (max abs)."""
    nudged = torch.nextafter(example_input, torch.full_like(example_input, float("inf")))
    with torch.no_grad():
        return max_abs_diff_of(model(nudged), model(example_input))[0]


#: A deploy difference at most this many times the model's own move under a one-step input change is rounding
ROUNDING_SENSITIVITY_FACTOR = 10


def _check_close(reference: object, candidate: nn.Module, example_input: torch.Tensor, atol: float,
                 rtol: float, backend: str, model: Optional[nn.Module] = None) -> float:
    """Max abs diff between the deployed and the original output (a tensor, or tuples / lists / dicts of them).
    ``model`` (the fused model) tells rounding from a wrong result when the difference is large."""
    with torch.no_grad():
        output = candidate(example_input.clone())  # the example stays as it was for the hint below
    try:
        diff, scale = max_abs_diff_of(output, reference)
    except ValueError as e:
        raise RuntimeError(f"deploy(backend={backend!r}): {e}. Use another backend, or report this with the "
                           "model name.") from None
    tolerance = atol + rtol * scale
    dtypes = {t.dtype for t in pytree.tree_leaves(reference) if isinstance(t, torch.Tensor)}
    low = bool(dtypes & {torch.float16, torch.bfloat16})
    relative_limit = (_HALF_RTOL if low else WRONG_RESULT_RTOL) * scale
    # only with the default tolerances: a caller who loosened them has said what they accept
    if atol <= DEFAULT_ATOL and rtol <= WRONG_RESULT_RTOL and diff <= tolerance and not diff <= relative_limit:
        raise RuntimeError(
            f"deploy(backend={backend!r}): output differs from the original model by max abs diff {diff:.3g}, "
            f"within the tolerance {tolerance:g} but {diff / scale if scale else float('inf'):.2g} of the "
            f"original's largest output ({scale:.3g}): a different result, not rounding (outputs this small pass an "
            "absolute tolerance whatever they are). Use another backend, or report this with the model name.")
    if not diff <= tolerance:
        hint = outside_tolerance_hint(diff, scale, dtypes, model, example_input, what="deploy",
                                      otherwise="Use another backend, or report this with the model name.")
        raise _OutsideTolerance(
            f"deploy(backend={backend!r}): output differs from the original model by max abs diff {diff:.3g} "
            f"(> tolerance {tolerance:g}). {hint}", diff, tolerance)
    return diff


def outside_tolerance_hint(diff: float, scale: float, dtypes: Set[torch.dtype], model: Optional[nn.Module],
                           example_input: torch.Tensor, what: str, otherwise: str) -> str:
    """What a difference ``diff`` beyond the tolerance is, and what to do: rounding at a bf16 / fp16 model's
    precision, float rounding at the scale ``scale`` of the original's outputs, or rounding that ``model`` (the
    fused model; None: not checked) amplifies; else ``otherwise``. ``dtypes``: the original output's dtypes;
    ``what``: the call the advice names (``deploy``, ``export``)."""
    low = bool(dtypes & {torch.float16, torch.bfloat16})
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16
    if low and diff <= _HALF_RTOL * scale:  # a bf16 / fp16 model: rounding of its own precision
        return (f"The model runs in {dtype} ({'8' if dtype == torch.bfloat16 else '11'}-bit mantissa), and this is "
                f"rounding at its precision (relative diff {diff / scale:.2g}); the default atol=1e-4 is meant for "
                f"float32: pass atol={diff * 2:.2g} (or rtol={_HALF_RTOL:g}), or {what} the float32 model.")
    if diff <= ROUNDING_RTOL * scale:  # e.g. randomly initialised MobileOne: outputs of 1e15 differ by 1e9
        return (f"The original's outputs reach {scale:.3g}, so this is float rounding at that scale (relative diff "
                f"{diff / scale:.2g}); with such outputs (random weights?) pass a larger atol, e.g. "
                f"atol={diff * 2:.2g}, or rtol={ROUNDING_RTOL:g}, or {what} the model with its trained weights.")
    if model is not None:
        # e.g. random-init MobileNetV4-Hybrid with trained-size layer scales: outputs ~5e5, and a 1e-7 change of the
        # input moves them by ~29 (found by a sweep)
        wobble = _rounding_sensitivity(model, example_input)
        if ROUNDING_SENSITIVITY_FACTOR * wobble >= diff:
            return (f"The model's own output moves by {wobble:.3g} when each input value moves by one float32 "
                    f"rounding step: it amplifies rounding (random weights?), so this difference is rounding, which "
                    f"no backend avoids. Pass a larger atol, e.g. atol={diff * 2:.2g}, or {what} the model with its "
                    f"trained weights.")
    return otherwise


class _OutsideTolerance(RuntimeError):
    def __init__(self, message: str, diff: float, tolerance: float):
        super().__init__(message)
        self.diff, self.tolerance = diff, tolerance


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


def _build_eager(model: nn.Module, example_input: torch.Tensor, rewrite: bool,
                 fp32_precision: str = "ieee", amx_share: float = 1.0) -> DeployedModel:
    optimizations = ["eval", FUSED]
    padded = pad_attention_head_dims(model)
    if padded:
        optimizations.append(f"q/k/v zero-padded to equal head widths in {padded} attention layers (fused SDPA)")
    memory_format = torch.contiguous_format
    cpu_fp32 = example_input.device.type == "cpu" and example_input.dtype == torch.float32
    if is_convolutional(model):
        memory_format = torch.channels_last
        model = model.to(memory_format=torch.channels_last)
        optimizations.append("channels_last")
        kernel_blocks = swap_attention(model) if rewrite and cpu_fp32 else 0
        if kernel_blocks:
            optimizations.append(f"SHViT attention (SHSA) between its convolutions on vitzoo's AVX-512 kernel: "
                                 f"{kernel_blocks} blocks")
        nhwc = use_nhwc_attention(model)
        if nhwc:
            optimizations.append(f"attention on the channels-last token view in {nhwc} layers")
    amx_linears = rewrite and cpu_fp32 and fp32_precision == "bf16x3" and amx_gemm.load() is not None
    # before the graph rewrite, which keeps these modules: on the plain model, without packing convolutions for
    # batches 1 and 2
    rows_kinds = classify_rows(model, example_input) if amx_linears else {}
    if rewrite and memory_format == torch.channels_last and cpu_fp32 and torch.backends.mkldnn.is_available():
        model, notes = onednn_rewrite(model, example_input.contiguous(memory_format=memory_format), fp32_precision,
                                      amx_share)
        optimizations.extend(notes)
        # the first convolution may read the NCHW image itself (vitzoo.image_conv): no channels-last copy then
        memory_format = getattr(model, "input_memory_format", memory_format)
    if rewrite and cpu_fp32 and fp32_precision == "bf16x3":
        swapped = swap_linears(model, amx_share, rows_kinds)
        if swapped:
            optimizations.append(f"linear layers in split bf16 (bf16x3) on AMX: {swapped}")
        if amx_gemm.load() is None:
            optimizations.append(f"IEEE fp32 (bf16x3 AMX kernel unavailable: {amx_gemm.unavailable_reason()})")
    return DeployedModel(model, "eager", memory_format, optimizations)


def _build_compile(model: nn.Module, example_input: torch.Tensor) -> DeployedModel:
    deployed = _build_eager(model, example_input, rewrite=False)
    deployed.model = torch.compile(deployed.model, options={"freezing": True})
    deployed.backend = "compile"
    deployed.optimizations.append("torch.compile(inductor, freezing=True)")
    return deployed


def _build_torchscript(model: nn.Module, example_input: torch.Tensor, atol: float, rtol: float) -> DeployedModel:
    from vitzoo.torchscript_backend import build

    deployed = _build_eager(model, example_input, rewrite=False)
    example = example_input.contiguous(memory_format=deployed.memory_format)
    if example.device.type == "cpu":
        size = chunk_stem(deployed.model, example)
        if size is not None:
            deployed.optimizations.append(f"stem run on slices of {size} images (keeps its activations in cache)")
    deployed.model, notes = build(deployed.model, example, atol=atol, rtol=rtol)
    deployed.backend = "torchscript"
    deployed.optimizations.extend(notes)
    return deployed


def _build_onnxruntime(model: nn.Module, example_input: torch.Tensor, opset: int) -> DeployedModel:
    from vitzoo.onnx_runtime import export_onnx, session_for_export

    notes = ["eval", FUSED]
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:  # e.g. a bf16 model: ONNX Runtime's CPU kernels run fp32
        # a copy: with inplace=True `model` is the caller's, which keeps its dtype (found by an audit)
        model = deepcopy_keeping_modes(model).float()
        notes.append(f"exported in float32 (the model was {', '.join(sorted(map(str, dtypes)))})")
    with torch.no_grad():  # the graph's outputs are given back in the model's own nesting
        output = model(example_input.float())  # both on the CPU (checked in deploy)
    try:
        layout = OutputLayout(output)
    except UnsupportedOutputError as e:
        raise RuntimeError(f"backend 'onnxruntime': {e}. Return it as a tensor or leave it out, or use "
                           "backend='eager'.") from None
    data = export_onnx(model, example_input.float(), opset=opset)
    session = session_for_export(data, layout)
    notes += [f"ONNX opset {opset}, dynamic batch", f"ONNX Runtime CPU, {session.num_threads} threads"]
    return DeployedModel(session, "onnxruntime", torch.contiguous_format, notes, fixed_size=True)


def check_arguments(atol: Any, rtol: Any, opset: Any, backend: str) -> None:
    """Refuse, before any work, an ``atol`` / ``rtol`` that is not a finite number >= 0 and (for the
    ``"onnxruntime"`` backend) an ``opset`` that is not an int the exporter writes (found by an audit: ``atol="1e-4"``
    failed after fusing and building, in words about str and float; ``atol=-1`` then advised a larger atol)."""
    from vitzoo.onnx_runtime import MAX_OPSET, MIN_OPSET

    for name, value, example in (("atol", atol, DEFAULT_ATOL), ("rtol", rtol, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (e.g. {name}={example:g}), got {value!r}.")
    if backend == "onnxruntime" and (isinstance(opset, bool) or not isinstance(opset, numbers.Integral)
                                     or not MIN_OPSET <= opset <= MAX_OPSET):
        raise ValueError(f"opset must be an int from {MIN_OPSET} to {MAX_OPSET} (the opsets this torch's ONNX "
                         f"exporter writes), got {opset!r}.")


def deploy(
        model: nn.Module,
        example_input: Optional[torch.Tensor] = None,
        backend: str = "eager",
        inplace: bool = False,
        verify: bool = True,
        atol: float = DEFAULT_ATOL,
        rtol: float = 0.0,
        opset: int = 17,
        fp32_precision: str = "bf16x3",
) -> DeployedModel:
    """Return ``model`` prepared for fast inference.

    Args:
        model: Any image model (timm or plain ``nn.Module``) taking a (B, C, H, W) tensor.
        example_input: Input used for tracing, export and verification; default: a random batch-1 tensor of
            the model's ``pretrained_cfg['input_size']``.
        backend: One of ``BACKENDS``: ``"eager"``, ``"compile"``, ``"onnxruntime"``, ``"torchscript"``.
        inplace: Fuse the caller's model in place instead of a deep copy (saves memory; the original is
            then changed).
        verify: Compare the deployed model's output with the original model's on ``example_input`` (on CUDA with
            TF32 off for the check, see :func:`full_fp32_precision`).
        atol: Largest allowed max abs difference in that check.
        rtol: Added to ``atol`` in units of the original's largest output magnitude (default 0: an absolute
            check); e.g. ``ROUNDING_RTOL`` for models with random weights, whose outputs can be huge.
        opset: ONNX opset for the ``"onnxruntime"`` backend (>= 17).
        fp32_precision: ``"bf16x3"`` (default): the ``"eager"`` backend runs fp32 convolutions and linear layers on
            the CPU's AMX tile unit in split bfloat16 where that is available and faster (:mod:`vitzoo.amx_gemm`,
            :mod:`vitzoo.amx_linear`: three bf16 products per fp32 product, ~1e-5 relative error per product, what
            ``torch.set_float32_matmul_precision("high")`` describes). It is kept only if the check's difference
            is within half the tolerance; otherwise the layers nearest the output are moved to IEEE fp32 share by
            share (``BF16X3_SHARES``), and finally all of them. ``"ieee"``: IEEE fp32 throughout. Other backends
            always run IEEE fp32. ``DeployedModel.fp32_precision`` and ``optimizations`` say what was used.

    Returns:
        A :class:`DeployedModel` (an ``nn.Module``) whose forward runs without autograd.

    Raises:
        ValueError: Unknown backend, or no example input and no ``pretrained_cfg``, or ``"onnxruntime"`` with a
            model or example input on a GPU (its session runs on the CPU), or a model on the ``meta`` device, or a
            TorchScript module (``torch.jit.script`` / ``trace``: deploy the ``nn.Module`` it was made from), or
            an ``example_input`` of batch size 0 or of another channel count than the model's ``in_chans``, or an
            ``atol`` / ``rtol`` that is not a finite number >= 0, or (with ``verify``) an output that keeps tensors
            in an object the check cannot look into (a dataclass: return a tuple, list, dict or namedtuple), or
            (``"onnxruntime"``) an ``opset`` that is not an int from ``MIN_OPSET`` to ``MAX_OPSET``.
        TypeError: ``model`` is not a module, or ``example_input`` is not a tensor (a numpy array, a list), or a
            float ``example_input`` of another dtype than its weights.
        RuntimeError: Backend unavailable here, or the deployed output differs by more than
            ``atol + rtol * max|original output|``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}.")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision={fp32_precision!r}; valid values: {', '.join(FP32_PRECISIONS)}.")
    check_arguments(atol=atol, rtol=rtol, opset=opset, backend=backend)
    for flag, value in (("inplace", inplace), ("verify", verify)):
        if not isinstance(value, bool):  # "no" is truthy (found by a review: verify="no" verified)
            raise TypeError(f"deploy(): {flag} must be True or False, got {value!r} ({type(value).__name__}).")
    if backend not in available_backends():
        raise RuntimeError(f"backend {backend!r} is not available here (available: "
                           f"{', '.join(available_backends())}); {missing_backend_hint(backend)}.")
    if not isinstance(model, nn.Module):
        raise TypeError(f"deploy() expects an nn.Module, got {type(model).__name__}.")
    model, unwrapped = _without_wrappers(model)
    _check_not_torchscript(model)
    check_materialised(model, "deploy()")
    if example_input is None:
        example_input = default_example_input(model)
    _check_example_is_a_batch(example_input)
    _check_example_dtype(model, example_input)
    _check_example_channels(model, example_input)
    _check_example_values(example_input)
    if backend == "onnxruntime":
        _check_not_cuda_for_onnxruntime(model, example_input)
        if example_input.dim() != 4:  # found by a review: refused only after the copy and fusion, in export's terms
            raise ValueError(f"deploy(backend='onnxruntime') exports image models, which take (B, C, H, W); "
                             f"example_input has shape {list(example_input.shape)}. Deploy this model with "
                             "backend='eager' or 'torchscript'.")
    given = example_input

    def example() -> torch.Tensor:  # a fresh copy for every run: a model may change its input in place
        return given.clone()        # (``x.sub_(mean)``; found by an audit: normalised again at every run)

    # the reference is the caller's model's own output, not its copy's: a copy whose hooks still act on the
    # original (a closure over the model's ``self``) computes something else, and was "verified" against itself
    reference = _eval_output(model, example()) if verify else None
    if verify:
        try:
            check_comparable(reference)
        except UnsupportedOutputError as e:
            raise ValueError(f"deploy(): {e}; or pass verify=False, which deploys without checking") from None
        _check_reference_values(reference)
    model = model if inplace else deepcopy_sharing_hooks(model)
    model.eval()
    hooks = hook_ids(model)
    model = reparameterize(model)
    model, standardised = standardise_weights(model)
    model, folded = fold_batchnorms(model, example())
    fusions = _fusion_notes(standardised, folded)
    model.requires_grad_(False)
    builders: Dict[str, Callable[[], DeployedModel]] = {
        "eager": lambda: _build_eager(model, example(), rewrite=True, fp32_precision=fp32_precision),
        "compile": lambda: _build_compile(model, example()),
        "onnxruntime": lambda: _build_onnxruntime(model, example(), opset),
        "torchscript": lambda: _build_torchscript(model, example(), atol, rtol),
    }
    deployed = _finish(builders[backend](), fusions, example(), model)
    deployed.optimizations[:0] = unwrapped
    _check_hooks_kept(hooks, deployed)
    if verify:
        with full_fp32_precision(example_input.device):
            deployed, diff = _verify(deployed, reference, model, example(), fusions, atol, rtol, backend)
        if backend == "onnxruntime":
            _check_another_batch(deployed, model, example(), atol, rtol)
        deployed.optimizations.append(f"verified: max abs diff {diff:.2g} vs original")
    return deployed


def _check_not_torchscript(model: nn.Module) -> None:
    """Refuse a TorchScript module (``torch.jit.script`` / ``trace``) before any work (found by a breadth test: every
    backend, with ``verify=False`` too, failed after fusing with torch's "requires_grad_ is not supported on
    ScriptModules"; its compiled code cannot be fused or rewritten, and its parameters are not the leaves deploy
    freezes). A model holding a scripted submodule is deployed, that part kept as it is."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"deploy() cannot deploy a TorchScript module ({type(model).__name__}, from torch.jit.script / trace): "
            "its compiled code cannot be fused or rewritten. Deploy the nn.Module it was made from (backend="
            "'torchscript' traces and freezes the fused model itself), or run the TorchScript module as it is; "
            "vitzoo.export.export_verified_onnx takes it as it is.")


def _without_wrappers(model: nn.Module) -> Tuple[nn.Module, List[str]]:
    """The module inside ``torch.compile`` / ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (any nesting),
    and a note for each wrapper taken off. deploy's own passes need the plain module (found by a review: deploy() of
    a compiled model got no oneDNN rewrite, torch.fx tracing the wrapper, and compiled the model just to compute the
    reference output; found by an audit: a DataParallel wrapper skipped the rewrite too, where count_flops took it
    off), and its compile backend compiles what they make."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing can have been compiled
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    notes = []
    while True:
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            kind, attribute = "torch.compile", "_orig_mod"
            note = "torch.compile wrapper taken off (backend='compile' compiles the deployed model)"
        elif isinstance(model, parallel):
            kind, attribute = type(model).__name__, "module"
            note = f"{kind} wrapper taken off (the deployed model runs the module it holds, on one device)"
        else:
            return model, notes
        hooks = len(model._forward_hooks) + len(model._forward_pre_hooks)
        if hooks:  # found by an audit: dropped with the wrapper, without a word
            raise ValueError(f"deploy(): the {kind} wrapper itself has {hooks} forward (pre-)hook(s), which "
                             "the deployed model would not run (deploy takes the module the wrapper holds): register "
                             f"them on model.{attribute}, or deploy model.{attribute} after moving them there.")
        model = getattr(model, attribute)
        notes.append(note)


def _check_another_batch(deployed: DeployedModel, model: nn.Module, example_input: torch.Tensor, atol: float,
                         rtol: float) -> None:
    """The ONNX graph's batch dimension is dynamic: check it at another batch size too (one image, or two for a
    one-image example), against the fused model (found by an audit: a model whose trace baked in the batch size
    was verified at the example's batch and wrong by 3.4 at another). Only a different result counts there
    (:func:`vitzoo.onnx_runtime.check_batch_dimension`): rounding was judged, with its advice, at the example's
    batch."""
    from vitzoo.onnx_runtime import OnnxExportError, check_batch_dimension, session_diffs

    batch = example_input.shape[0]
    other = (example_input[:1] if batch > 1 else torch.cat([example_input, example_input.flip(-1)])).float()
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in (*model.parameters(), *model.buffers())):
        model = deepcopy_keeping_modes(model).float()  # what was exported; the fused model keeps the caller's dtype
    try:
        check_batch_dimension(session_diffs(model, deployed.model, [other], batch), batch, atol, rtol)
    except OnnxExportError as e:
        raise OnnxExportError(f"deploy(backend='onnxruntime'): {e}.") from e


def _eval_output(model: nn.Module, example_input: torch.Tensor) -> Any:
    """``model``'s output for ``example_input`` in eval mode, without grad and in full fp32 precision; every
    module's training flag and buffers are put back afterwards (found by a review: a buffer the forward updates, a
    call counter or a running average, was changed in the caller's model by deploy()'s reference run)."""
    modes = {module: module.training for module in model.modules()}
    buffers = [(module, name, buffer, buffer.detach().clone()) for module in model.modules()
               for name, buffer in module._buffers.items() if buffer is not None]
    try:
        with torch.no_grad(), full_fp32_precision(example_input.device):
            return model.eval()(example_input)
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for module, name, buffer, value in buffers:
                if buffer.shape == value.shape:
                    module._buffers[name] = buffer  # the same tensor object, as the caller's other names see it
                    buffer.copy_(value)
                else:
                    module._buffers[name] = value


def _check_hooks_kept(hooks: Dict[int, str], deployed: DeployedModel) -> None:
    """The eager and compile backends run the model's modules: each forward hook must still be on one of them.
    (The others trace the model: a hook runs once while tracing, and what it does to an output is in the trace.)"""
    if deployed.backend not in ("eager", "compile") or not hooks:
        return
    lost = lost_hooks(hooks, deployed.model)
    if lost:
        raise RuntimeError(f"deploy() lost the forward hooks on {', '.join(lost)}, which it should have kept (its "
                           f"passes leave hooked modules alone). Hook the deployed model's modules instead, or "
                           f"report this with the model name.")


def _verify(deployed: DeployedModel, reference: object, model: nn.Module, example_input: torch.Tensor,
            fusions: List[str], atol: float, rtol: float, backend: str) -> Tuple[DeployedModel, float]:
    """Check ``deployed``. A bf16x3 model that misses the tolerance or its margin is rebuilt with fewer layers on
    AMX, those nearest the output in IEEE fp32 (their rounding reaches the output undamped: SHViT-S1 with
    trained-size logits differed by 5.5e-5 all-bf16x3, 1.7e-5 with its last stage in IEEE fp32), share by share
    (``BF16X3_SHARES``), and if none passes, in IEEE fp32 throughout."""
    tried: List[str] = []
    shares = list(BF16X3_SHARES[1:]) + [0.0]
    share = BF16X3_SHARES[0]
    while True:
        try:
            bf16x3 = deployed.fp32_precision == "bf16x3"  # its misses are retried: no hint for them
            diff = _check_close(reference, deployed, example_input, atol, rtol, backend, None if bf16x3 else model)
            if deployed.fp32_precision == "bf16x3":
                _check_bf16x3_margin(diff, atol + rtol * max_abs_diff_of(reference, reference)[1])
            break
        except RuntimeError as e:
            if deployed.fp32_precision != "bf16x3":
                raise
            # split bf16 rounds ~100x coarser than fp32: a tight tolerance or a model whose outputs amplify
            # rounding can miss it where IEEE fp32 passes
            if isinstance(e, _OutsideTolerance):
                reason = f"missed the tolerance (max abs diff {e.diff:.3g} > {e.tolerance:g})"
            else:
                reason = str(e) if isinstance(e, _SmallMargin) else f"failed ({str(e).split(': ', 1)[-1]})"
            tried.append(f"bf16x3 in {share:.0%} of the eligible layers {reason}")
            failed_layers = _amx_layer_count(deployed)
            while True:  # the next share that changes which layers run on AMX (a small model: 90% may be all)
                restore_linears(model)  # swapped in place on the fused copy
                share = shares.pop(0)
                deployed = _finish(_build_eager(model, example_input.clone(), rewrite=True,
                                                fp32_precision="bf16x3" if share else "ieee", amx_share=share),
                                   fusions, example_input.clone(), model)
                if not share or _amx_layer_count(deployed) < failed_layers:
                    break
    if tried:
        what = "IEEE fp32" if deployed.fp32_precision == "ieee" else \
            f"bf16x3 in the first {share:.0%} of the eligible layers, IEEE fp32 in the rest (nearest the output)"
        deployed.optimizations.append(f"{what}: " + "; ".join(tried))
    return deployed, diff


#: The shares of AMX-eligible layers (the first ones in execution order) that :func:`deploy` tries in bf16x3, in
#: turn, before IEEE fp32 throughout (90% since 2026-11-25: SHViT-S1 with trained-size logits, just over the margin
#: all-bf16x3, then kept 49 instead of 41 of its 54 eligible convolutions for two of four example batches).
BF16X3_SHARES = (1.0, 0.9, 0.75, 0.5, 0.25)


def _amx_layer_count(deployed: DeployedModel) -> int:
    model = deployed.model
    return sum(isinstance(m, AmxLinear) or isinstance(m, PackedConv2d) and m.amx for m in model.modules()) \
        if isinstance(model, nn.Module) else 0


#: bf16x3 is kept only if its difference on the example is at most this share of the tolerance: the check sees one
#: input, and other inputs can differ more (an audit found random-weight MobileNetV3-L at 0.8 of 1e-4 on its
#: example and 1.06 of it on other batches, 1.33x). Half leaves room for that and keeps models whose outputs are of
#: trained size (SHViT-S1 with logits scaled to 12-15: 3.7e-5, the audit)
BF16X3_TOLERANCE_SHARE = 0.5


class _SmallMargin(RuntimeError):
    pass


def _check_bf16x3_margin(diff: float, tolerance: float) -> None:
    if diff > BF16X3_TOLERANCE_SHARE * tolerance:
        raise _SmallMargin(f"left too little margin: max abs diff {diff:.2g} on the example, more than "
                           f"{BF16X3_TOLERANCE_SHARE:g} of the tolerance {tolerance:g}")


def _fusion_notes(standardised: int, folded: int) -> List[str]:
    """What deploy's own fusion passes did, for ``DeployedModel.optimizations``."""
    notes = []
    if standardised:
        notes.append(f"weight-standardised convolutions made plain (weight standardised once): {standardised}")
    if folded:
        notes.append(f"BatchNorm folded into the conv/linear before it in {folded} layers")
    return notes


def _finish(deployed: DeployedModel, fusions: List[str], example_input: torch.Tensor,
            model: nn.Module) -> DeployedModel:
    deployed.optimizations[2:2] = fusions
    deployed.set_example(example_input)
    # eval mode throughout, as deploy() says: modules built after the model's eval() (the wrapper, packed
    # convolutions) started in nn.Module's training mode (found by a review: ``deployed.training`` was True)
    deployed.train(False)
    # the model's cfg on every backend: timm.data.resolve_data_config(model=deployed) reads its preprocessing
    # (found by an audit: an ONNX Runtime session has none, so a ViT's mean 0.5 became ImageNet's)
    deployed.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if deployed.fixed_size and deployed.pretrained_cfg and example_input.dim() == 4:
        # the size the graph is fixed to, so that timm's transforms resolved from the deployed model fit it (found by
        # a review: the cfg's 224 while the session took only the example's 64 x 64)
        deployed.pretrained_cfg["input_size"] = tuple(example_input.shape[1:])
    return deployed
