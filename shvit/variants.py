"""The SHViT variant table (paper Table 1) and the reference numbers each variant must reproduce."""
from typing import Any, Dict, Optional, Sequence

__all__ = ['VARIANTS', 'VARIANT_STATS', 'variant_name']

# architecture hyper-parameters of the registered models (qk_dim is 16 everywhere, the SHViT default)
VARIANTS: Dict[str, Dict[str, Any]] = {
    'shvit_s1': dict(embed_dim=(128, 224, 320), depth=(2, 4, 5), partial_dim=(32, 48, 68), types=('i', 's', 's')),
    'shvit_s2': dict(embed_dim=(128, 308, 448), depth=(2, 4, 5), partial_dim=(32, 66, 96), types=('i', 's', 's')),
    'shvit_s3': dict(embed_dim=(192, 352, 448), depth=(3, 5, 5), partial_dim=(48, 75, 96), types=('i', 's', 's')),
    'shvit_s4': dict(embed_dim=(224, 336, 448), depth=(4, 7, 6), partial_dim=(48, 72, 96), types=('i', 's', 's')),
}

# Reference numbers, all for num_classes=1000, in_chans=3, distilled=False.
# params / params_fused: exact parameter counts before / after re-parameterisation (BN folding).
# gmacs_fused: fvcore count of the fused model at img_size, batch 1 (fvcore counts multiply-adds; the paper's "FLOPs").
# top1 / top5: timm's ImageNet-1k validation results for the timm/shvit_sX.in1k weights; paper_top1: paper Table 2.
VARIANT_STATS: Dict[str, Dict[str, Any]] = {
    'shvit_s1': dict(img_size=224, params=6_330_808, params_fused=6_308_660, gmacs_fused=0.24140,
                     top1=72.780, top5=91.024, paper_top1=72.8),
    'shvit_s2': dict(img_size=224, params=11_483_072, params_fused=11_453_508, gmacs_fused=0.36551,
                     top1=75.184, top5=92.316, paper_top1=75.2),
    'shvit_s3': dict(img_size=224, params=14_245_273, params_fused=14_210_010, gmacs_fused=0.60071,
                     top1=77.356, top5=93.310, paper_top1=77.4),
    'shvit_s4': dict(img_size=256, params=16_588_484, params_fused=16_546_248, gmacs_fused=0.98643,
                     top1=79.362, top5=94.370, paper_top1=79.4),
}


def variant_name(embed_dim: Sequence[int], depth: Sequence[int]) -> Optional[str]:
    """Name of the registered variant with these stage widths and depths, or None."""
    for name, cfg in VARIANTS.items():
        if tuple(cfg['embed_dim']) == tuple(embed_dim) and tuple(cfg['depth']) == tuple(depth):
            return name
    return None
