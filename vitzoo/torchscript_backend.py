"""The ``"torchscript"`` backend of :func:`vitzoo.deploy`: a frozen TorchScript trace, with oneDNN Graph fusion on CPU.

``torch.jit.trace`` + ``torch.jit.freeze`` turn the fused model into a graph run by TorchScript's C++ executor. On
CPU (fp32 / bf16) oneDNN Graph ("LLGA", ``torch.jit.enable_onednn_fusion``) then partitions that graph into fused
oneDNN kernels (convolution / matmul with bias, ReLU, residual add, ...) that keep oneDNN's blocked memory layout
between them, and pays one C++ call per partition instead of one Python call per op. On the 2-vCPU machine of
``docs/benchmarks.md`` this is 1-10% faster than the ``"eager"`` backend on SHViT at batch 16.

Caveats, also in ``docs/deploy.md``:

* TorchScript is deprecated upstream (``torch.jit.trace`` / ``freeze`` emit ``FutureWarning``; this module silences
  exactly those). The backend is offered while PyTorch ships it; :func:`torchscript_available` says whether it does.
* The oneDNN Graph switch is process-global in PyTorch. :class:`TorchScriptModule` turns it on only for the
  duration of its own calls and restores the previous value; calls from several threads take turns (a lock), and
  other TorchScript models must not run concurrently in other threads while it runs. It does the same with the
  profiling executor / profiling mode that the fusion pass runs in (timm's own test file turns the mode off), and
  reports fusion only when the executed graph has it.
* Each new input shape is traced, frozen and warmed up on its first call (a few seconds for SHViT on 2 CPU cores;
  the last 4 shapes are kept): one graph per shape, because a fused graph re-specialising for a second shape
  can crash inside oneDNN Graph (see :class:`TorchScriptModule`). Each fused graph's output is compared with the
  eager model's on the shape's first input; a graph that oneDNN Graph computes wrong (torch 2.14: timm's dla34 and
  hrnet_w18_small) is replaced by an unfused trace for that shape, with a note.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from vitzoo.outputs import OutputLayout, UnsupportedOutputError, max_abs_diff_of, outputs_close

__all__ = ["TorchScriptModule", "build", "onednn_graph_available", "torchscript_available"]

#: A fused trace whose output differs from the eager model's by more than this times its largest value is wrong,
#: not rounded (oneDNN Graph's rounding on SHViT: ~1e-6 relative).
FUSED_RTOL = 1e-3
WARMUP_CALLS = 3  # the profiling executor profiles, then optimises (and fuses) on the following call


def torchscript_available() -> bool:
    """True when this PyTorch still has ``torch.jit.trace`` and ``torch.jit.freeze``."""
    return hasattr(torch, "jit") and hasattr(torch.jit, "trace") and hasattr(torch.jit, "freeze")


def onednn_graph_available() -> bool:
    """True when this PyTorch can fuse TorchScript graphs with oneDNN Graph (x86 CPU builds with oneDNN)."""
    return (torchscript_available() and hasattr(torch.jit, "enable_onednn_fusion")
            and torch.backends.mkldnn.is_available())


# TorchScript's process-global executor switches that oneDNN Graph fusion needs on: it happens in the profiling
# executor's optimisation pass. Other code may turn them off: timm's own test file does, at import
# (``_jit_set_profiling_mode(False)``), and fusion then silently never happens. Private API, used when present.
_EXECUTOR_SWITCHES = ("_jit_set_profiling_executor", "_jit_set_profiling_mode")  # each returns the previous value
#: Held while a :class:`TorchScriptModule` builds or runs a graph: the switches above and oneDNN Graph's are
#: process-global, so calls from several threads take turns (interleaved, a thread's unfused graph ran with another's
#: fusion switched on: oneDNN "could not create a primitive descriptor", and the switch was left on; found by an audit)
_SWITCHES_LOCK = threading.RLock()


@contextlib.contextmanager
def _onednn_fusion(enabled: bool) -> Iterator[None]:
    """Set PyTorch's process-global oneDNN Graph switch for the block (and, when enabling, the profiling executor
    it runs in), then restore them."""
    if not onednn_graph_available():
        yield
        return
    previous = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(enabled)
    restore = []
    if enabled:
        for name in _EXECUTOR_SWITCHES:
            setter = getattr(torch._C, name, None)
            if setter is not None:
                restore.append((setter, setter(True)))
        optimize = getattr(torch._C, "_get_graph_executor_optimize", None)
        set_optimize = getattr(torch._C, "_set_graph_executor_optimize", None)
        if optimize is not None and set_optimize is not None:
            restore.append((set_optimize, optimize()))
            set_optimize(True)
    try:
        yield
    finally:
        for setter, value in reversed(restore):
            setter(value)
        torch.jit.enable_onednn_fusion(previous)


def _first_sentence(error: Exception, limit: int = 160) -> str:
    """The error's own message, without TorchScript's traceback lines or a repeated "RuntimeError: " prefix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    prefix = f"{type(error).__name__}: "
    while message.startswith(prefix):
        message = message[len(prefix):]
    message = message.split(". ")[0].rstrip(".")
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _has_onednn_fusion_group(graph: torch.Graph) -> bool:
    """True when the executed graph (or a block nested in it) holds a oneDNN Graph fusion group."""
    def walk(block) -> bool:
        return any(node.kind() == "prim::oneDNNFusionGroup" or any(walk(b) for b in node.blocks())
                   for node in block.nodes())
    return walk(graph)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """torch's deprecation notice for ``torch.jit``, and the tracer's warnings about Python values it fixes as
    constants (timm's shape asserts: "Converting a tensor to a Python boolean"): every trace is checked against the
    eager model on its own input shape, and each new shape gets its own trace, so they are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


class TorchScriptModule(nn.Module):
    """Runs ``model`` as frozen TorchScript, one trace per input shape, with oneDNN Graph fusion when requested.

    Each input shape gets its own trace (built on first use, the ``max_cached_shapes`` last used kept): a fused
    TorchScript graph that re-specialises itself for a second shape can crash inside oneDNN Graph (seen with
    torch 2.14: a SHViT traced at 224x224 and then called at 64x64 segfaulted), while a graph that only ever sees
    one shape either works or raises at its warm-up. A shape on which the fused graph raises gets an unfused trace,
    with a ``RuntimeWarning`` (also recorded in ``notes``).

    Args:
        model: The eval-mode (fused) model to trace; kept, so that new shapes can be traced.
        onednn_fusion: Use oneDNN Graph fusion (CPU only).
        atol: A fused graph for a new input shape is kept only if its output is within ``atol + rtol * max|output|``
            of the eager model's (``deploy``'s tolerance; the example's shape is checked by ``deploy`` itself).
        rtol: See ``atol``.
    """
    max_cached_shapes = 4
    #: The most traces one module builds. ``torch.jit.freeze`` keeps memory a trace that is dropped does not give
    #: back (torch 2.14: ~25 MB per trace of resnet18, also with no vitzoo code involved), so a model called at ever
    #: new shapes grew without bound (found by an audit: +3 GB over 120 calls rotating six shapes); past this many
    #: traces, a shape that has none runs the kept eager model, with a ``RuntimeWarning`` once.
    max_traces = 16

    def __init__(self, model: nn.Module, onednn_fusion: bool, atol: float = 1e-4, rtol: float = 0.0):
        super().__init__()
        self.model = model
        self.onednn_fusion = onednn_fusion
        self.atol = atol
        self.rtol = rtol
        self.notes: List[str] = []
        # traced modules in a plain dict: not submodules, so state_dict() holds the weights once (from ``model``)
        self._traced: Dict[tuple, Tuple[nn.Module, bool]] = {}
        self._built = 0  # traces built so far (see max_traces)

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return tuple(x.shape), x.dtype, x.device, channels_last

    def _traced_for(self, x: torch.Tensor) -> Optional[Tuple[nn.Module, bool]]:
        """The trace for ``x``'s shape, built if needed; ``None`` once ``max_traces`` are built and it has none."""
        key = self._key(x)
        with _SWITCHES_LOCK:
            entry = self._traced.get(key)
            if entry is not None and next(reversed(self._traced)) != key:  # least recently used first, as
                self._traced[key] = self._traced.pop(key)                   # PackedConv2d's cache
            if entry is None:
                if self._built >= self.max_traces:
                    note = (f"{self.max_traces} input shapes traced: further new shapes run the fused model eagerly "
                            "(a dropped trace does not give back its memory)")
                    if self._note(note):
                        warnings.warn(f"deploy(backend='torchscript'): {note}", RuntimeWarning, stacklevel=4)
                    return None
                entry = self._build(x)  # may raise (bad input): the cache is left as it was
                self._built += 1
                if len(self._traced) >= self.max_cached_shapes:
                    self._traced.pop(next(iter(self._traced)))
                self._traced[key] = entry
        return entry

    def _build(self, x: torch.Tensor) -> Tuple[nn.Module, bool]:
        # every run here gets its own copy of the input, which the caller's call then gets as it was: a model may
        # change its input in place (``x.sub_(mean)``; found by a review: normalised at every run, then wrong)
        fuse = self.onednn_fusion and onednn_graph_available()
        with torch.no_grad():  # one eager call first: the model's own input checks raise here (tracing skips them)
            expected = self.model(x.clone())
        layout = OutputLayout(expected)  # a value a trace cannot return is refused here, by name
        traced = _trace(self.model, x.clone(), layout)
        if not fuse:
            return traced, False
        hazard = _FUSION_HAZARDS.get(traced)
        if hazard is not None:  # never run fused: the process would abort, past any check
            self._note(f"oneDNN Graph not used for input shape {list(x.shape)}: {hazard}")
            _warm_up(traced, x.clone(), fused=False)
            return traced, False
        try:
            _warm_up(traced, x.clone(), fused=True)
            executed = getattr(torch.jit, "last_executed_optimized_graph", None)
            found = executed is None or _has_onednn_fusion_group(executed())  # no way to look: trust the switch
            if not found:
                self._note(f"oneDNN Graph found nothing to fuse for input shape {list(x.shape)}")
                return traced, False
            # every new shape is checked against the eager model: oneDNN Graph computes some models wrong
            # (torch 2.14: timm's dla34, hrnet_w18_small), and a wrong partition would otherwise go unnoticed
            with torch.no_grad(), _onednn_fusion(True):
                output = traced(x.clone())
            if outputs_close(output, expected, rel=FUSED_RTOL):
                diff, scale = max_abs_diff_of(output, expected)
                if diff <= self.atol + self.rtol * scale:
                    return traced, True
                note = (f"oneDNN Graph's output for input shape {list(x.shape)} differs from the eager model's by "
                        f"{diff:.3g}, more than deploy's tolerance {self.atol + self.rtol * scale:.3g}; that shape "
                        "runs without it")
            else:
                note = (f"oneDNN Graph computed a different output for input shape {list(x.shape)}; that shape "
                        "runs without it")
        except Exception as e:  # noqa: BLE001  oneDNN Graph rejects some patterns / shapes at run time
            note = (f"oneDNN Graph fusion failed for input shape {list(x.shape)} ({type(e).__name__}: "
                    f"{_first_sentence(e)}); that shape runs without it")
        if self._note(note):
            warnings.warn(f"deploy(backend='torchscript'): {note}", RuntimeWarning, stacklevel=4)
        traced = _trace(self.model, x.clone(), layout)
        _warm_up(traced, x.clone(), fused=False)
        return traced, False

    #: The most notes kept (the oldest go first)
    MAX_NOTES = 32

    def _note(self, note: str) -> bool:
        """Add ``note`` unless it is there already; whether it is new (found by an audit: a shape traced again
        after its eviction added its note, and its warning, once more, so the notes grew with every rotation)."""
        if note in self.notes:
            return False
        self.notes.append(note)
        del self.notes[:-self.MAX_NOTES]
        return True

    def forward(self, x: torch.Tensor) -> Any:
        with _SWITCHES_LOCK:  # one thread at a time (the switches are process-global)
            entry = self._traced_for(x)
            if entry is None:
                return self.model(x)
            traced, fused = entry
            with _onednn_fusion(fused):
                return traced(x)

    def extra_repr(self) -> str:
        return f"onednn_fusion={self.onednn_fusion}, traced shapes={[list(k[0]) for k in self._traced]}"


def build(model: nn.Module, example_input: torch.Tensor, atol: float = 1e-4,
          rtol: float = 0.0) -> Tuple[TorchScriptModule, List[str]]:
    """Wrap ``model`` (eval mode, already fused) in a :class:`TorchScriptModule` and build it for ``example_input``.

    oneDNN Graph fusion is used for CPU inputs of dtype float32 / bfloat16 when available.

    Returns:
        The module and a list of human-readable notes on what was applied.

    Raises:
        RuntimeError: TorchScript is not available in this PyTorch, or the model cannot be traced (its output
            holds a value other than tensors and None, for one; the error names it).
    """
    if not torchscript_available():
        raise RuntimeError(f"backend 'torchscript' needs torch.jit.trace/freeze, which torch {torch.__version__} "
                           "does not have; use backend='eager'.")
    fuse = (onednn_graph_available() and example_input.device.type == "cpu"
            and example_input.dtype in (torch.float32, torch.bfloat16))
    module = TorchScriptModule(model, onednn_fusion=fuse, atol=atol, rtol=rtol)
    try:
        _, fused = module._traced_for(example_input)
    except UnsupportedOutputError as e:
        raise RuntimeError(f"backend 'torchscript': {e}. Return it as a tensor or leave it out, or use "
                           "backend='eager'.") from None
    except Exception as e:  # arbitrary user models can fail to trace in many ways
        raise RuntimeError(f"backend 'torchscript': tracing failed ({type(e).__name__}: {e}); "
                           "use backend='eager'.") from e
    notes = ["TorchScript trace + freeze, one trace per input shape"]
    if fused:
        notes.append("oneDNN Graph fusion (torch.jit.enable_onednn_fusion, on for this module's calls only)")
    return module, notes + module.notes


class _TensorsOf(nn.Module):
    """``model`` returning the tensors of its output alone (:meth:`OutputLayout.flat`): what a trace can return."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return OutputLayout.flat(self.model(x))


class _Nested(nn.Module):
    """A trace of :class:`_TensorsOf` whose output is given back in the model's own nesting (namedtuples, ``None``
    entries and dicts of them included; a trace alone returns plain tuples and refuses ``None``)."""

    def __init__(self, traced: torch.jit.ScriptModule, layout: OutputLayout):
        super().__init__()
        self.traced = traced
        self.layout = layout

    def forward(self, x: torch.Tensor) -> Any:
        return self.layout.nest(self.traced(x))


#: Why oneDNN Graph must not run a trace :func:`_trace` returned (:func:`_one_row_product_then_add`); traces it may
#: run are not in it
_FUSION_HAZARDS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _trace(model: nn.Module, example_input: torch.Tensor, layout: OutputLayout) -> nn.Module:
    """The frozen trace of ``model`` on ``example_input``, recorded in :data:`_FUSION_HAZARDS` when oneDNN Graph
    must not run it."""
    with _quiet_tracing(), torch.no_grad():
        flat = _TensorsOf(model).eval()
        trace = torch.jit.trace(flat, example_input, check_trace=False, strict=False)
        hazard = _one_row_product_then_add(trace.inlined_graph)  # the shapes are known before freezing only
        traced = torch.jit.freeze(trace)
    # in-place ops -> out-of-place where that is safe: oneDNN Graph mishandles some in-place ops with a Python
    # scalar (e.g. SHViT's ``attn.mul_(scale)``: "expected scalar type Double but found Float")
    remove_mutation = getattr(torch._C, "_jit_pass_remove_mutation", None)  # private API: use it when present
    if remove_mutation is not None:
        remove_mutation(traced.graph)
    result = traced if layout.spec.is_leaf() else _Nested(traced, layout)  # a plain tensor: no Python layer
    if hazard is not None:
        _FUSION_HAZARDS[result] = hazard
    return result


#: Matrix products as a trace records them (``nn.Linear`` is ``aten::linear``)
_PRODUCTS = frozenset({"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})
_ADDS = frozenset({"aten::add", "aten::add_"})
#: How many same-shape (elementwise) ops may stand between the product and the addition
_ELEMENTWISE_HOPS = 4


def _sizes(value: torch._C.Value) -> Optional[List[int]]:
    """The sizes the trace recorded for ``value``; None for a value that is no tensor or of unknown sizes."""
    kind = value.type()
    sizes = kind.sizes() if isinstance(kind, torch._C.TensorType) else None
    return sizes if sizes is not None and all(isinstance(n, int) for n in sizes) else None


def _one_row_product_then_add(graph: torch.Graph) -> Optional[str]:
    """Why oneDNN Graph must not run this traced graph, else None: a matrix product over a single row whose
    result, directly or through elementwise ops (an activation, a scale), is added to another tensor.

    torch 2.14's oneDNN Graph fuses the addition into the product as a post-op, and on a single row (e.g.
    ``x + mlp(x)`` on a class token at batch 1: VOLO's class-attention blocks) that kernel corrupts the heap: the
    process aborts a call or two later (``free(): invalid size``, ``munmap_chunk(): invalid pointer``), past any
    check (found by a breadth test: ``deploy(volo_d1_224, torch.randn(1, 3, 64, 64), backend='torchscript')``
    aborted; reproduced with ``x + nn.Linear(1152, 384)(y)`` on ``(1, 1152)`` alone; not at 2 rows, nor with 384
    inputs). The shapes are those the trace recorded: the graph before freezing."""
    for node in graph.nodes():
        if node.kind() not in _PRODUCTS:
            continue
        out = node.output()
        sizes = _sizes(out)
        if sizes is None or math.prod(sizes[:-1]) != 1:
            continue
        frontier, seen = [out], set()
        for _ in range(_ELEMENTWISE_HOPS + 1):
            following = []
            for value in frontier:
                for use in value.uses():
                    user = use.user
                    tensors = [v for v in user.inputs() if _sizes(v) is not None]
                    if user.kind() in _ADDS and len(tensors) >= 2:
                        return (f"a matrix product over one row ({node.kind()} of shape {sizes}) followed by an "
                                "addition, which oneDNN Graph fusion can compute with a heap corruption in torch "
                                "2.14 (the process aborts)")
                    for result in user.outputs():
                        if _sizes(result) == sizes and result.unique() not in seen:
                            seen.add(result.unique())
                            following.append(result)
            frontier = following
    return None


def _warm_up(traced: nn.Module, example_input: torch.Tensor, fused: bool) -> None:
    with torch.no_grad(), _onednn_fusion(fused):
        for _ in range(WARMUP_CALLS):
            traced(example_input.clone())  # a fresh copy each: see TorchScriptModule._build
