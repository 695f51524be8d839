"""ONNX export of a PyTorch model, and an ``nn.Module`` that runs the exported graph in ONNX Runtime.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): the dynamo
exporter needs ``onnxscript``, which is not a dependency of this package. The input's batch dimension is
exported as dynamic (``batch``), as is each output axis that follows it (``batch`` where it is the batch size,
``<output>_dim<axis>`` where it grows otherwise, e.g. flattened tokens); other output axes are not declared dynamic
(the exporter's shape inference may still name some it cannot size), and the input's height and width are fixed to
the example's.

Example::

    onnx_bytes = export_onnx(model, torch.randn(1, 3, 224, 224))
    ort_model = OnnxRuntimeModule(onnx_bytes)
    max_diff = max_abs_diff(model, ort_model, [torch.randn(1, 3, 224, 224), torch.randn(3, 3, 224, 224)])
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree as pytree

from vitzoo.mha_fastpath import mha_fastpath_off
from vitzoo.messages import first_line
from vitzoo.outputs import WRONG_RESULT_RTOL, OutputLayout, UnsupportedOutputError, max_abs_diff_of

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "OnnxExportError", "export_onnx", "OnnxRuntimeModule",
           "check_batch_dimension", "max_abs_diff", "max_abs_diff_and_scale", "require_onnxruntime",
           "session_diffs", "session_for_export"]

DEFAULT_OPSET = 17
MIN_OPSET = 17
try:  # the newest opset the TorchScript-based exporter writes (20 in torch 2.14)
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET
except ImportError:  # private constant; without it the exporter's own error stands
    MAX_OPSET = 10 ** 6
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class OnnxExportError(RuntimeError):
    """PyTorch's ONNX exporter could not export the model (its forward is not traceable by it)."""


def require_onnxruntime() -> None:
    """Raise a RuntimeError with an install hint when ``onnx`` or ``onnxruntime`` is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"ONNX support needs the 'onnx' and 'onnxruntime' packages ({e}). "
            "Install them with `pip install onnx onnxruntime` (the package's `onnx` extra)."
        ) from e


def export_onnx(
        model: nn.Module,
        example_input: torch.Tensor,
        opset: int = DEFAULT_OPSET,
) -> bytes:
    """Export ``model`` to an ONNX model held in memory, with a dynamic batch dimension.

    Args:
        model: Model to export (fuse it first). It runs and is exported in eval mode; its modules' modes are put
            back afterwards (found by an audit: a model in training mode ran three times in it, moving its
            BatchNorm statistics).
        example_input: One input tensor (B, C, H, W); H and W become fixed in the graph.
        opset: ONNX opset version, at least ``MIN_OPSET``.

    Returns:
        The serialized ONNX ModelProto.

    Raises:
        OnnxExportError: The model itself fails on ``example_input`` (said so, without the exporter), or its
            output holds a value other than tensors and None (named; a graph returns tensors only), or the
            exporter failed. Where timm's attention layers call ``F.scaled_dot_product_attention``
            (their ``fused_attn`` flag) and the first try fails, the export is tried once more with those layers
            on their explicit matmul-softmax path (e.g. timm's EVA-02, whose SDPA call torch 2.14's exporter
            rejects); the flags are restored afterwards, and an error of that retry is the one reported. Also
            before the exporter runs: weights of ``PROTOBUF_LIMIT`` (2 GiB) or more, which one ONNX file cannot hold.
    """
    require_onnxruntime()
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use opset >= {MIN_OPSET}.")
    if opset > MAX_OPSET:
        raise ValueError(f"opset {opset} is newer than this torch's ONNX exporter supports: use "
                         f"{MIN_OPSET} <= opset <= {MAX_OPSET}.")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ValueError(
            f"example_input must be a 4-D image tensor (B, C, H, W), got "
            f"{getattr(example_input, 'shape', type(example_input).__name__)}."
        )
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if size >= PROTOBUF_LIMIT:
        raise OnnxExportError(f"cannot export this model into one ONNX file: its weights take {size / 2 ** 30:.2f} "
                              f"GiB; {_TOO_LARGE}")
    with modes_kept(model):
        model.eval()
        return _export_in_eval_mode(model, example_input, opset)


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Give ``model``'s modules back in the training / eval modes they had, whatever the body sets."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _export_in_eval_mode(model: nn.Module, example_input: torch.Tensor, opset: int) -> bytes:
    try:
        with torch.no_grad():
            output = model(example_input)
    except Exception as e:  # noqa: BLE001  the model's own failure, before the exporter is involved
        raise OnnxExportError(f"the model fails on a {list(example_input.shape)} input, before any export: "
                              f"{_one_line(e)}") from e
    try:
        OutputLayout(output)
    except UnsupportedOutputError as e:
        raise OnnxExportError(f"cannot export this model: {e}. Return it as a tensor or leave it out.") from None
    flat = OutputLayout.flat(output)
    bf16 = [i for i, t in enumerate([flat] if isinstance(flat, torch.Tensor) else flat) if t.dtype == torch.bfloat16]
    if bf16:  # found by an audit: numpy's missing bfloat16 failed the check with "No corresponding Numpy type"
        raise OnnxExportError(f"cannot export this model: its output {bf16[0]} is a bfloat16 tensor, which ONNX "
                              f"Runtime's Python API cannot hand back (numpy has no bfloat16). Return it as float32 "
                              f"(.float()), or use another backend.")
    axes = _output_axes(model, example_input, output)
    try:
        return _export(model, example_input, opset, axes)
    except Exception as first:  # noqa: BLE001  the exporter fails in many ways; reported below as one error
        if not _fused_attention_modules(model) or _advice(first):
            raise OnnxExportError(f"torch.onnx.export cannot export this model ({_one_line(first)}){_advice(first)}"
                                  ) from first
        try:  # timm's attention without F.scaled_dot_product_attention: the same maths, written out
            with _unfused_attention(model):
                return _export(model, example_input, opset, axes)
        except Exception as second:  # noqa: BLE001
            if _one_line(second) == _one_line(first):
                raise OnnxExportError(f"torch.onnx.export cannot export this model ({_one_line(first)}), also not "
                                      f"with timm's unfused attention{_advice(second)}") from first
            # the retry got past the first failure: its own error is the one left to fix (found by an audit: EVA-02
            # built with dynamic_img_size=True was reported as the attention error the retry works around)
            raise OnnxExportError(
                f"torch.onnx.export cannot export this model ({_one_line(first)}); with timm's unfused attention it "
                f"fails further on ({_one_line(second)}){_advice(second)}") from second


#: protobuf's limit on one serialized message: a graph whose weights reach it cannot be one self-contained file
PROTOBUF_LIMIT = 2 ** 31
_TOO_LARGE = ("an ONNX file that holds its weights is limited to 2 GiB (protobuf's limit). torch.onnx.export(model, x, "
              "'model.onnx') writes larger weights beside the graph as external data; or run the model with "
              "vitzoo.deploy's 'eager' or 'compile' backend")


def _advice(error: Exception) -> str:
    """What to do about an exporter failure we recognise ('; ...'), else ''."""
    text = str(error)
    if "2GiB" in text or "2 GiB" in text:  # constant folding can grow a graph past the limit
        return "; " + _TOO_LARGE
    if re.search(r"upsample_\w+_aa", text):
        return ("; that is antialiased interpolation (F.interpolate(..., antialias=True)), which this exporter cannot "
                "write. timm's ViTs built with dynamic_img_size=True use it to resample their position embedding at "
                "run time: create such a model with img_size=(H, W) instead (the graph's size is fixed anyway)")
    return ""


def output_names(count: int) -> List[str]:
    """The graph's output names: ``logits``-style single name, or one per tensor of a tuple / dict output."""
    return [OUTPUT_NAME] if count == 1 else [f"{OUTPUT_NAME}_{i}" for i in range(count)]


def _output_axes(model: nn.Module, example_input: torch.Tensor, output: object) -> Optional[List[Dict[int, str]]]:
    """Per output tensor, its axes that grow with the batch: ``batch`` where the axis is the batch size itself, else
    ``<output name>_dim<axis>`` (a batch of flattened tokens); other axes are fixed. Found in review:
    every output's axis 0 was declared ``batch``, also for an output that does not follow the batch (a weight, a
    scalar), which a consumer of the file takes for a dimension tied to the input's. ``None`` where the model
    cannot run one image more (then every output's axis 0 is ``batch``; the verification at other batch sizes
    judges the graph)."""
    batch = example_input.shape[0]
    if batch == 0:
        return None
    try:
        with torch.no_grad():
            grown = model(torch.cat([example_input, example_input[:1]]))
        before, after = OutputLayout.flat(output), OutputLayout.flat(grown)
    except Exception:  # noqa: BLE001  a model that takes one batch size only; judged by the verification
        return None
    before = [before] if isinstance(before, torch.Tensor) else list(before)
    after = [after] if isinstance(after, torch.Tensor) else list(after)
    if len(before) != len(after) or any(a.dim() != b.dim() for a, b in zip(before, after)):
        return None
    names = output_names(len(before))
    return [{axis: "batch" if (m, n) == (batch, batch + 1) else f"{name}_dim{axis}"
             for axis, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n}
            for name, a, b in zip(names, before, after)]


def _export(model: nn.Module, example_input: torch.Tensor, opset: int,
            axes: Optional[List[Dict[int, str]]] = None) -> bytes:
    buffer = io.BytesIO()
    with torch.no_grad():
        names = output_names(sum(OutputLayout(model(example_input)).is_tensor))  # the exporter leaves out None
    output_axes = [{0: "batch"}] * len(names) if axes is None or len(axes) != len(names) else axes
    # the fused nn.MultiheadAttention of no_grad has no ONNX form (found by a review: every model holding one,
    # torchvision's ViT too, was "not exportable"); unfused, it exports
    with torch.no_grad(), _exporter_log_off(), mha_fastpath_off(), warnings.catch_warnings():
        # timm's shape asserts trace to constants, and the exporter warns about what it folds or keeps (constant
        # folding of a strided Slice, a weight-standardising batch_norm in train mode): the export is verified
        # against the model at other batch sizes afterwards, so these are noise for its callers
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model,
            (example_input.contiguous(),),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: axis for name, axis in zip(names, output_axes) if axis}},
            do_constant_folding=True,
        )
    return _named_outputs(buffer.getvalue(), names)


def _named_outputs(data: bytes, names: List[str]) -> bytes:
    """The exported graph with its outputs named ``names``: the exporter keeps its own name for an output that
    does not depend on the input (a constant, folded: found by a review, ``8`` instead of ``output_1``), so such an
    output gets an ``Identity`` to the name asked for."""
    try:
        import onnx
    except ImportError:  # the names stay the exporter's (the package comes with the 'onnx' extra)
        return data
    model = onnx.load_from_string(data)
    outputs = model.graph.output
    if len(outputs) != len(names) or all(o.name == n for o, n in zip(outputs, names)):
        return data
    for output, name in zip(outputs, names):
        if output.name != name:
            model.graph.node.append(onnx.helper.make_node("Identity", [output.name], [name]))
            output.name = name
    return model.SerializeToString()


@contextlib.contextmanager
def _exporter_log_off() -> Iterator[None]:
    """Keep the exporter's log off for the block, so that a failed export does not print its whole IR graph.

    torch 2.14's TorchScript-based exporter turns its C++ log on for every export (``setup_onnx_logging`` tests
    the function ``_jit_is_onnx_log_enabled`` instead of calling it), and on a failure that log writes the
    traced graph to stdout: hundreds of lines for a real model. The exporter's own context manager is replaced
    by one that keeps the log off for this export (private API, used when present).
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter_utils
    except ImportError:
        yield
        return
    original = getattr(exporter_utils, "setup_onnx_logging", None)
    if original is None or not hasattr(torch._C, "_jit_set_onnx_log_enabled"):
        yield
        return

    @contextlib.contextmanager
    def log_off(verbose: bool) -> Iterator[None]:
        was_enabled = torch._C._jit_is_onnx_log_enabled()
        torch._C._jit_set_onnx_log_enabled(bool(verbose))
        try:
            yield
        finally:
            torch._C._jit_set_onnx_log_enabled(was_enabled)

    exporter_utils.setup_onnx_logging = log_off
    try:
        yield
    finally:
        exporter_utils.setup_onnx_logging = original


def _fused_attention_modules(model: nn.Module) -> List[nn.Module]:
    """timm attention modules that call ``F.scaled_dot_product_attention`` (their ``fused_attn`` flag is on)."""
    return [m for m in model.modules() if getattr(m, "fused_attn", None) is True]


@contextlib.contextmanager
def _unfused_attention(model: nn.Module) -> Iterator[None]:
    """Switch timm's fused attention off in ``model`` for the block (the explicit matmul-softmax path)."""
    modules = _fused_attention_modules(model)
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True


_TRANSLATING = re.compile(r"\(Occurred when translating [^)]+\)")


def _one_line(error: Exception, limit: int = 200) -> str:
    """``Type: message`` on one line: the message's first non-empty line (the exporter's details follow it), plus
    the exporter's "(Occurred when translating OP)" note from the rest, which names the operator that failed."""
    message = first_line(error)
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    where = _TRANSLATING.search(str(error))
    return f"{text} {where.group(0)}" if where and where.group(0) not in text else text


class GraphWithoutInputError(ValueError):
    """An ONNX graph with no input: the exported model's output did not depend on its input."""


class OnnxRuntimeModule(nn.Module):
    """Runs an ONNX model in an ONNX Runtime CPU session behind an ``nn.Module`` interface.

    Takes and returns torch tensors (fp32, CPU). It has no parameters; ``state_dict()`` is empty. With
    ``output_layout`` (an :class:`~vitzoo.outputs.OutputLayout` of the exported model's output) the graph's outputs
    are given back in the model's own nesting, ``None`` entries included.

    With more than one thread, ONNX Runtime's worker threads keep spinning after each call, waiting for the next
    one (~40 ms of CPU after a 2-thread SHViT call on the benchmark machine, ``benchmarks/bench_spin_interference.py``).
    That is ONNX Runtime's default and the fastest for back-to-back calls, but the spin competes with whatever the
    process does between calls (pre-processing, other models); ``spinning=False`` makes idle workers sleep.

    Args:
        onnx_model: Serialized ONNX model (bytes) or a path to a ``.onnx`` file.
        num_threads: Intra-op threads of the session; default ``torch.get_num_threads()``.
        spinning: Let idle intra-op threads spin (ONNX Runtime's ``session.intra_op.allow_spinning``).
    """

    def __init__(self, onnx_model: Union[bytes, str, os.PathLike], num_threads: Optional[int] = None,
                 spinning: bool = True, output_layout: Optional[OutputLayout] = None):
        super().__init__()
        self.output_layout = output_layout
        require_onnxruntime()
        import onnxruntime as ort

        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):  # found by an audit: -1, 2.7, '4', 0 were taken
            raise ValueError(f"num_threads must be a positive int (or None for torch.get_num_threads()), got "
                             f"{num_threads!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.log_severity_level = 4  # fatal only: errors are raised, and its log line (in red) would repeat them
        self.spinning = spinning
        if isinstance(onnx_model, (bytearray, memoryview)):
            onnx_model = bytes(onnx_model)
        if not isinstance(onnx_model, bytes) and not Path(onnx_model).is_file():  # found by an audit: ONNX
            # Runtime's "[ONNXRuntimeError] : 3 : NO_SUCHFILE"
            raise FileNotFoundError(f"no ONNX file at {onnx_model} (pass the path of a .onnx file, or its bytes)")
        source = onnx_model if isinstance(onnx_model, bytes) else str(Path(onnx_model))
        self.session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        if not self.session.get_inputs():  # found by an audit: an IndexError, reported as an invalid graph
            raise GraphWithoutInputError(
                "the ONNX graph takes no input: the model's output does not depend on its input (it returns weights "
                "or constants only), so the exporter left the input out; such a model needs no ONNX graph "
                "(vitzoo.deploy: backend='eager')")
        self.input_name = self.session.get_inputs()[0].name
        self._batch_axes = _batch_axes(self.session)
        self.num_threads = options.intra_op_num_threads
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4  # as above

    def forward(self, x: torch.Tensor) -> Any:
        """The output as the exported model returned it: a tensor, or (with ``output_layout``) the same nesting;
        a graph of several outputs without ``output_layout`` gives a tuple. The input is run as float32 on the
        CPU (what the graph takes)."""
        if x.dim() == 0:
            raise ValueError("an ONNX Runtime session takes a batch (a tensor of at least one dimension), got a 0-d "
                             "tensor")
        if x.shape[0] == 0:  # an empty batch, as eager PyTorch takes it; ONNX Runtime fails on it (a Reshape): one
            # image, then each output's axes that follow the batch cut to 0 (found in review: axis 0 of every output
            # was cut, also of an output that does not follow the batch)
            outs = self._run(x.new_zeros((1, *x.shape[1:])))
            if self._batch_axes is None:  # the graph names no output axis that follows the batch: the axes that
                # grow from one image to two (found by an audit: axis 0 of every output was cut, also of a table
                # that does not follow the batch)
                two = self._run(x.new_zeros((2, *x.shape[1:])))
                self._batch_axes = [[axis for axis, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n]
                                    for a, b in zip(outs, two)]
            outs = [_cut(out, axes) for out, axes in zip(outs, self._batch_axes)]
        else:
            outs = self._run(x)
        if self.output_layout is not None:
            return self.output_layout.nest(outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(self, x: torch.Tensor) -> List[torch.Tensor]:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(out) for out in self.session.run(None, {self.input_name: array}, self.run_options)]

    def extra_repr(self) -> str:
        return f"threads={self.num_threads}, spinning={self.spinning}"


def _cut(out: torch.Tensor, axes: List[int]) -> torch.Tensor:
    for axis in axes:
        out = out.narrow(axis, 0, 0)
    return out


def _batch_axes(session: Any) -> Optional[List[List[int]]]:
    """Per output of ``session``, the axes the export declared to follow the batch (:func:`_output_axes`:
    ``batch``, ``<output>_dim<axis>``); ``None`` for a graph that declares none (no output follows the batch, or
    another exporter's names): the caller then finds them by running the graph."""
    found = []
    for out in session.get_outputs():
        shape = out.shape if isinstance(out.shape, (list, tuple)) else []
        found.append([axis for axis, dim in enumerate(shape)
                      if dim == "batch" or dim == f"{out.name}_dim{axis}"])
    return found if any(found) else None


def session_for_export(onnx_model: bytes, output_layout: OutputLayout) -> OnnxRuntimeModule:
    """An :class:`OnnxRuntimeModule` for a graph :func:`export_onnx` wrote; ONNX Runtime refusing to load it is an
    :class:`OnnxExportError` that says so (found by an audit: timm's EVA-02 built with ``dynamic_img_size=True``
    exported into a graph ONNX Runtime refuses, and its raw "ShapeInferenceError" reached the user)."""
    try:
        return OnnxRuntimeModule(onnx_model, output_layout=output_layout)
    except GraphWithoutInputError as e:
        raise OnnxExportError(f"cannot export this model: {e}") from e
    except Exception as e:  # noqa: BLE001  onnxruntime's own exception types (Fail, InvalidGraph, ...)
        raise OnnxExportError(f"ONNX Runtime cannot load the graph torch.onnx.export wrote for this model "
                              f"({_one_line(e, limit=400)}): the exporter wrote an invalid graph; run the model with "
                              f"another backend, or report this with the model name") from e


@torch.no_grad()
def session_diffs(model: nn.Module, session: nn.Module, inputs: Iterable[torch.Tensor],
                  exported_batch: int) -> List[Tuple[int, float, float]]:
    """``(batch size, max abs diff, largest |output|)`` of ``session``, a graph exported at batch size
    ``exported_batch``, against ``model``, per input. The session failing on an input, or giving outputs of another
    shape, is an :class:`OnnxExportError` that names the batch size (found by an audit: ONNX Runtime's raw error
    reached the user)."""
    measured = []
    for x in inputs:
        # each run gets its own copy: a model that changes its input in place must not change the session's
        try:
            output = model(x.clone())
        except Exception as e:  # noqa: BLE001  the model's own failure (found by an audit: raised bare)
            raise OnnxExportError(f"the PyTorch model itself fails on the check batch of {x.shape[0]} images, "
                                  f"before ONNX Runtime is compared with it: {_one_line(e, limit=400)}") from e
        expected = pytree.tree_map(lambda t: t.float().cpu() if isinstance(t, torch.Tensor) else t, output)
        try:
            diff, largest = max_abs_diff_of(session(x.clone()), expected)
        except Exception as e:  # noqa: BLE001  onnxruntime's run errors, or outputs of another shape
            raise OnnxExportError(batch_failure(x.shape[0], exported_batch, _one_line(e, limit=400))) from e
        measured.append((x.shape[0], diff, largest))
    return measured


def check_batch_dimension(measured: Sequence[Tuple[int, float, float]], exported_batch: int, atol: float,
                          rtol: float) -> None:
    """Refuse a graph that is right at its exported batch size only: ``measured`` (:func:`session_diffs`) holds,
    at another batch size, a difference beyond the tolerance that is a different result (over ``WRONG_RESULT_RTOL``
    of the largest output), not rounding, while the entries at the exported batch size, if any, are within the
    tolerance (found by an audit: a graph whose trace baked in the batch size was silently wrong at other sizes).
    Rounding, even a model's amplified rounding, is left to the caller's tolerance check and its advice."""
    def within(diff: float, largest: float) -> bool:
        return diff <= atol + rtol * largest

    if not all(within(diff, largest) for batch, diff, largest in measured if batch == exported_batch):
        return  # wrong at the exported batch size too: not a matter of the batch dimension
    for batch, diff, largest in measured:
        if batch != exported_batch and not within(diff, largest) and not diff <= WRONG_RESULT_RTOL * largest:
            share = f", {diff / largest:.2g} of its largest" if largest else " (all zeros)"
            raise OnnxExportError(batch_failure(batch, exported_batch,
                                                f"max abs diff {diff:.3g} to PyTorch's output{share}"))


def batch_failure(batch: int, exported_batch: int, what: str) -> str:
    """The message for an exported graph that fails or differs (``what``) at batch size ``batch``."""
    if batch == exported_batch:
        return f"the exported graph fails in ONNX Runtime at batch {batch}, the batch it was exported at ({what})"
    return (f"the graph exported at batch {exported_batch} fails or differs at batch {batch} ({what}): most likely "
            f"the model's forward turns the batch size into a constant when traced (e.g. x.shape[0] as a Python "
            f"number in a reshape or an expand), so the graph holds that batch size. Write such shapes with -1 or "
            f"from the input tensor, or run the model with another backend. Or its forward branches on the input's "
            f"values (if x.sum() > 0: ...), and the trace kept the branch the example took")


@torch.no_grad()
def max_abs_diff(reference: nn.Module, candidate: nn.Module, inputs: Iterable[torch.Tensor]) -> float:
    """Largest absolute difference between the outputs of two models over several inputs.

    Raises:
        RuntimeError: When output shapes differ.
    """
    return max_abs_diff_and_scale(reference, candidate, inputs)[0]


@torch.no_grad()
def max_abs_diff_and_scale(reference: nn.Module, candidate: nn.Module,
                           inputs: Iterable[torch.Tensor]) -> Tuple[float, float]:
    """:func:`max_abs_diff` and the largest absolute value of the reference's outputs over the same inputs."""
    worst, scale = 0.0, 0.0
    for x in inputs:
        expected = pytree.tree_map(lambda t: t.float().cpu() if isinstance(t, torch.Tensor) else t, reference(x))
        try:
            diff, largest = max_abs_diff_of(candidate(x), expected)
        except ValueError as e:
            raise RuntimeError(f"{e} (PyTorch's), for input {tuple(x.shape)}.") from None
        scale = max(scale, largest)
        if diff != diff:
            return diff, scale
        worst = max(worst, diff)
    return worst, scale
