"""Ours ``vitzoo.deploy(shvit_sX)`` (default eager backend) vs timm's built-in SHViT, fused, eager, same weights.

timm's model is built from ``timm.models.shvit`` directly (``import shvit`` replaces the registry names) and
fused with ``timm.utils.reparameterize_model``. Both run under ``torch.inference_mode``; the extra column
"timm fused + channels_last" shows how much of the gain is the memory format alone, and "ONNX Runtime" (the same
fused model in ONNX Runtime, ``deploy(backend="onnxruntime")``) shows what a non-PyTorch runtime reaches on this CPU;
"ours torchscript" is ``deploy(backend="torchscript")``, a PyTorch path in IEEE fp32 (not the default backend).
"ours deploy()" is the default, which runs convolutions in split bf16 ("bf16x3") on CPUs with AMX
(``vitzoo.amx_gemm``; IEEE fp32 elsewhere); "ours ieee" is ``deploy(fp32_precision="ieee")``, the same path in IEEE
fp32 throughout. The "precision" column says which the default used at that row's thread count, on the timed
batch (the runners' own deployment: the bf16x3 fallback's choice can depend on both), "max abs diff" is against
timm's output. Without onnxruntime installed the ONNX Runtime columns say n/a.
Each runner is timed in its own process (``_isolated.py``; ``--no-isolate`` times them all in this process).

The script also prints what the 1.6x goal asks of the hardware: 1.6 x timm's img/s x the fused model's MACs per
image, next to the core's measured FMA peak (``fma_peak.c``, see ``bench_peak_fraction.py``).

    python benchmarks/bench_shvit_vs_timm.py --rounds 7 --batch 16 --threads 1 2
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import timm  # noqa: E402
import torch  # noqa: E402
from timm.models import shvit as timm_shvit  # noqa: E402
from timm.utils import reparameterize_model  # noqa: E402

import vitzoo  # noqa: E402,F401  (registers our shvit_s*)
from _common import base_parser, inference, print_machine, print_table, randomize_norm_stats, timed  # noqa: E402
from _isolated import measure_isolated  # noqa: E402
from bench_peak_fraction import measured_fma_peak  # noqa: E402
from vitzoo.flops import count_flops  # noqa: E402
from vitzoo.inference import available_backends, deploy  # noqa: E402

CASES = (("shvit_s1", 224), ("shvit_s4", 256))
RUNNERS = ("timm fused", "timm fused + channels_last", "ours deploy()", "ours ieee", "ours torchscript",
           "ONNX Runtime")
GOAL = 1.6


def scale_logits(model: torch.nn.Module, res: int, largest: float) -> None:
    """Scale the classifier (weight and bias) so that the largest logit on a fixed random batch is ``largest``:
    outputs of the size a trained ImageNet classifier gives (10-20), where random weights give ~1. Used to see
    what ``deploy()``'s bf16x3 keeps for such outputs (its difference grows with them)."""
    x = torch.randn(16, 3, res, res, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        factor = largest / model.eval()(x).abs().max().item()
        model.head.l.weight.mul_(factor)
        model.head.l.bias.mul_(factor)


def build_models(name: str, logits: float = 0.0) -> tuple:
    """(ours, timm's fused SHViT with the same weights, the same in channels-last); ``logits`` > 0: the classifier
    scaled so that the largest logit is about that (:func:`scale_logits`)."""
    torch.manual_seed(0)  # the same weights in this process and in every worker, whatever ran before
    ours = randomize_norm_stats(timm.create_model(name))
    if logits:
        scale_logits(ours, dict(CASES)[name], logits)
    theirs = getattr(timm_shvit, name)().eval()
    assert type(theirs) is timm_shvit.SHViT, "expected timm's built-in SHViT class"
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs = reparameterize_model(theirs)
    return ours, theirs, reparameterize_model(theirs).to(memory_format=torch.channels_last)


def timed_batch(batch: int, res: int) -> torch.Tensor:
    """The batch every runner is built with (``deploy``'s example) and timed on."""
    return torch.randn(batch, 3, res, res, generator=torch.Generator().manual_seed(1))


def build_runner(kind: str, name: str, res: int, batch: int, threads: int, logits: float = 0.0):
    """One runner of ``RUNNERS`` (also called in the isolated worker processes; same seed, same weights)."""
    torch.set_num_threads(threads)
    ours, theirs, theirs_cl = build_models(name, logits)
    x = timed_batch(batch, res)
    if kind == "timm fused":
        return inference(theirs, x)
    if kind == "timm fused + channels_last":
        return inference(theirs_cl, x.contiguous(memory_format=torch.channels_last))
    if kind == "ours deploy()":
        return inference(deploy(ours, x), x)
    if kind == "ours ieee":
        return inference(deploy(ours, x, fp32_precision="ieee"), x)
    if kind == "ours torchscript":
        return inference(deploy(ours, x, backend="torchscript"), x)
    if kind == "ONNX Runtime":
        return inference(deploy(ours, x[:1], backend="onnxruntime"), x)
    raise ValueError(kind)


def runners_here() -> list:
    """``RUNNERS`` less ONNX Runtime where it is not installed (an optional extra; the goal is ours vs timm)."""
    return [k for k in RUNNERS if k != "ONNX Runtime" or "onnxruntime" in available_backends()]


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="time all runners in this process instead of one process each")
    parser.add_argument("--logits", type=float, default=0.0,
                        help="scale each classifier so that its largest logit is about this (trained-model size, "
                             "e.g. 13; default: random weights' ~1)")
    args = parser.parse_args()
    print_machine(args.threads)
    peaks = {threads: measured_fma_peak(threads) for threads in args.threads}
    runners = runners_here()
    if len(runners) < len(RUNNERS):
        print("ONNX Runtime: not installed, its columns say n/a (pip install onnx onnxruntime)")
    rows, ratios, needs = [], [], []
    for name, res in CASES:
        if name not in args.models:
            continue
        ours, theirs, _ = build_models(name, args.logits)
        macs = count_flops(ours, res).total
        x = timed_batch(args.batch, res)
        with torch.inference_mode():
            expected = theirs(x)
        for threads in args.threads:
            # what the "ours" runners deploy at this thread count (the bf16x3 fallback's choice can depend on it)
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            default, ieee = deploy(ours, x), deploy(ours, x, fp32_precision="ieee")
            with torch.inference_mode():
                diffs = [(d(x) - expected).abs().max().item() for d in (default, ieee)]
            torch.set_num_threads(previous)
            desc = f"{name}@{res} {threads}t"
            if args.isolate:
                t = measure_isolated({k: (build_runner, (k, name, res, args.batch, threads, args.logits))
                                      for k in runners},
                                     args.batch, rounds=args.rounds, min_time=args.min_time, desc=desc)
            else:
                t = timed({k: build_runner(k, name, res, args.batch, threads, args.logits) for k in runners},
                          args.batch, args.rounds, args.min_time, desc)
            base, cl, ours_t, ieee_t, ts_t, ort_t = (t[k].throughput if k in t else None for k in RUNNERS)
            ratio = ours_t / base
            ratios.append(ratio)
            amx = sum(getattr(m, "amx", False) for m in default.modules())
            rows.append([f"{name}@{res}", threads, f"{default.fp32_precision} ({amx} AMX convs)", base, cl, ours_t,
                         ieee_t, ts_t, "n/a" if ort_t is None else ort_t, f"{ratio:.2f}x", f"{ieee_t / base:.2f}x",
                         f"{ts_t / base:.2f}x", "n/a" if ort_t is None else f"{ort_t / base:.2f}x",
                         "n/a" if ort_t is None else f"{ours_t / ort_t:.2f}x", f"{diffs[0]:.1e} / {diffs[1]:.1e}"])
            need = GOAL * base * macs
            peak = peaks[threads]
            needs.append(f"{name}@{res} {threads}t: {GOAL}x needs {need / 1e9:.1f} GMAC/s; ours reaches "
                         f"{ours_t * macs / 1e9:.1f}; measured FMA peak "
                         + ("n/a" if peak is None else f"{peak / 1e9:.1f} (the goal needs {need / peak:.0%} of it)"))
    print_table(["model", "threads", "precision", "timm fused img/s", "timm fused+CL img/s", "ours deploy() img/s",
                 "ours ieee img/s", "ours torchscript img/s", "ORT img/s", "ours / timm", "ieee / timm",
                 "torchscript / timm", "ORT / timm", "ours / ORT", "max abs diff ours / ieee"], rows,
                title=f"SHViT: ours deploy() vs timm built-in fused eager (batch {args.batch}, median of {args.rounds} "
                      f"rounds, {'one process per runner' if args.isolate else 'one process'})")
    print("\nwhat the goal asks of the hardware (fvcore MACs of the fused model x img/s):")
    print("\n".join(f"  {line}" for line in needs))
    print(f"\nratios: {', '.join(f'{r:.2f}x' for r in ratios)} (goal >= {GOAL}x: "
          f"{'met' if ratios and min(ratios) >= GOAL else 'NOT met'} for all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
