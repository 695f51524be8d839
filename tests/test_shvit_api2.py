"""SHViT configurations that timm's (and the official) SHViT build: built here too, with timm's weights and outputs.

The reference is ``timm.models.shvit.SHViT``: its state dict loads strictly and the outputs agree."""
import copy

import pytest
import torch
from timm.models.shvit import SHViT as TimmSHViT

import shvit
from norms import randomize_norms  # tests/norms.py


def _pair(**kwargs):
    """(ours, timm's) with the same weights (norms randomised), eval mode."""
    torch.manual_seed(0)
    ref = TimmSHViT(**kwargs)
    ours = randomize_norms(shvit.SHViT(**kwargs))
    ours.load_state_dict(ref.state_dict(), strict=True)  # same keys and shapes: the check that the configs agree
    randomize_norms(ours)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.eval(), ref.eval()


@torch.no_grad()
def test_attention_over_all_channels_pdim_equal_to_dim_matches_timm():
    """Found by an audit: ``partial_dim`` equal to the stage width (every channel attends, the paper's partial ratio
    1) was refused ("SHSA needs 0 < pdim < dim"), while timm's and the official SHSA build it, so such a model and
    its weights could not be used here."""
    ours, ref = _pair(embed_dim=(64, 96, 128), partial_dim=(16, 96, 128), depth=(1, 2, 1), types=('i', 's', 's'))
    x = torch.randn(2, 3, 96, 80)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    nhwc = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    for module in nhwc.modules():
        if isinstance(module, shvit.attention.SHSA):
            module.nhwc = True
    torch.testing.assert_close(nhwc(x.to(memory_format=torch.channels_last)), ref(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.jit.script(ours)(x), ref(x), rtol=0, atol=1e-5)
    fused = copy.deepcopy(ours).fuse()
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='pdim=160, dim=128'):  # more partial channels than the stage has
        shvit.SHViT(embed_dim=(64, 96, 128), partial_dim=(16, 96, 160), depth=(1, 1, 1))


@torch.no_grad()
def test_stem_width_not_divisible_by_8_rounds_down_as_timm():
    """Found by an audit: ``embed_dim[0]`` not divisible by 8 was refused; timm's and the official stem build it with
    the widths rounded down (100 -> 12, 25, 50, 100), so timm's weights for it could not load here."""
    ours, ref = _pair(embed_dim=(100, 128, 160), partial_dim=(16, 32, 40), depth=(1, 1, 2), types=('i', 's', 's'))
    assert [ours.patch_embed[i].c.out_channels for i in (0, 2, 4, 6)] == [12, 25, 50, 100]
    x = torch.randn(2, 3, 64, 72)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match='embed_dim\\[0\\] must be at least 8'):  # a stem conv of 0 channels
        shvit.SHViT(embed_dim=(4, 128, 160), partial_dim=(16, 32, 40), depth=(1, 1, 1))
