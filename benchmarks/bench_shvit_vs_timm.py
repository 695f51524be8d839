"""Ours ``vitzoo.deploy(shvit_sX)`` (default eager backend) vs timm's built-in SHViT, fused, eager, same weights.

timm's model is built from ``timm.models.shvit`` directly (``import shvit`` replaces the registry names) and
fused with ``timm.utils.reparameterize_model``. Both run under ``torch.inference_mode``; the extra column
"timm fused + channels_last" shows how much of the gain is the memory format alone, and "ONNX Runtime" (the same
fused model in ONNX Runtime, ``deploy(backend="onnxruntime")``) shows what a non-PyTorch runtime reaches on this CPU.

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
from vitzoo.inference import deploy  # noqa: E402

CASES = (("shvit_s1", 224), ("shvit_s4", 256))


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    args = parser.parse_args()
    print_machine(args.threads)
    rows, ratios = [], []
    for name, res in CASES:
        if name not in args.models:
            continue
        ours = randomize_norm_stats(timm.create_model(name))
        theirs = getattr(timm_shvit, name)().eval()
        assert type(theirs) is timm_shvit.SHViT, "expected timm's built-in SHViT class"
        theirs.load_state_dict(ours.state_dict(), strict=True)
        theirs = reparameterize_model(theirs)
        theirs_cl = reparameterize_model(theirs).to(memory_format=torch.channels_last)
        x = torch.randn(args.batch, 3, res, res)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for threads in args.threads:
            torch.set_num_threads(threads)
            deployed = deploy(ours, x)
            ort = deploy(ours, x[:1], backend="onnxruntime")
            with torch.inference_mode():
                diff = (deployed(x) - theirs(x)).abs().max().item()
            t = timed({"timm fused": inference(theirs, x), "timm fused + channels_last": inference(theirs_cl, x_cl),
                       "ours deploy()": inference(deployed, x), "ONNX Runtime": inference(ort, x)},
                      args.batch, args.rounds, args.min_time, f"{name}@{res} {threads}t")
            base, cl, ours_t, ort_t = (t[k].throughput for k in (
                "timm fused", "timm fused + channels_last", "ours deploy()", "ONNX Runtime"))
            ratio = ours_t / base
            ratios.append(ratio)
            rows.append([f"{name}@{res}", threads, base, cl, ours_t, ort_t, f"{ratio:.2f}x", f"{ort_t / base:.2f}x",
                         f"{diff:.1e}"])
    print_table(["model", "threads", "timm fused img/s", "timm fused+CL img/s", "ours deploy() img/s",
                 "ORT img/s", "ours / timm", "ORT / timm", "max |diff|"], rows,
                title=f"SHViT: ours deploy() vs timm built-in fused eager (batch {args.batch}, median of {args.rounds} rounds)")
    print(f"\nratios: {', '.join(f'{r:.2f}x' for r in ratios)} (goal >= 1.6x: "
          f"{'met' if ratios and min(ratios) >= 1.6 else 'NOT met'} for all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
