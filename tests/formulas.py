"""Hand-written FLOP formulas for plain ViT / DeiT / ReViT, the independent reference for the counter's tests.

fvcore's convention: one multiply-add is one FLOP (MAC); a LayerNorm costs 5 per element (affine).
"""
from typing import Sequence

V_DIM = 64  # ReViT's (and DeiT's) value width per head
MAC_OPS = ("conv", "linear", "matmul", "bmm", "einsum", "addmm", "scaled_dot_product_attention")


def vit_macs(emb: int, heads: Sequence[int], qk: Sequence[int], mlp: Sequence[int], tokens: int, classifiers: int,
             patches: int = 196, num_classes: int = 1000, v: int = V_DIM) -> int:
    """Multiply-adds of a ViT with per-block widths: patch embed, per block q/k/v, attention, proj, MLP, head(s)."""
    total = patches * (16 * 16 * 3) * emb  # 16x16 patches of 3 channels -> emb
    for h, d, m in zip(heads, qk, mlp):
        total += tokens * emb * (2 * h * d + h * v)  # q, k (h*d wide) and v (h*v wide)
        total += h * tokens * tokens * (d + v)  # Q K^T and A V
        total += tokens * h * v * emb  # proj
        total += 2 * tokens * emb * m  # fc1, fc2
    return total + classifiers * emb * num_classes


def layer_norm_flops(blocks: int, tokens: int, emb: int) -> int:
    """Two LayerNorms per block and the final one, on every token."""
    return (2 * blocks + 1) * tokens * emb * 5


# ReViT dims from the official redistribution rule (reference nvit.md §1.5), written out by hand.
REVIT = {  # name: (EMB, heads, QK per head, MLP, paper GFLOPs from the code dims)
    "revit_t": (176, [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10], [16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16],
                [528] * 3 + [1056] * 6 + [528] * 3, 1.14),
    "revit_s": (384, [10, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 10], [32, 16, 16, 32, 32, 32, 32, 32, 32, 16, 16, 32],
                [1152] * 3 + [2304] * 6 + [1152] * 3, 4.71),
}
