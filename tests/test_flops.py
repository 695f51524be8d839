"""vitzoo.flops against published numbers, hand-derived formulas and fvcore's own matmul handle."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitzoo.flops import count_flops, count_params

from formulas import MAC_OPS, REVIT, vit_macs  # tests/formulas.py

# SHViT paper Table 2 FLOPs = fvcore on the BN-fused model (reference shvit.md, "numbers to reproduce").
SHVIT = {  # name: (resolution, fused MFLOPs, params unfused, params fused)
    "shvit_s1": (224, 241.40, 6_330_808, 6_308_660),
    "shvit_s2": (224, 365.51, 11_483_072, 11_453_508),
    "shvit_s3": (224, 600.71, 14_245_273, 14_210_010),
    "shvit_s4": (256, 986.43, 16_588_484, 16_546_248),
}


@pytest.mark.parametrize("name", sorted(SHVIT))
def test_shvit_fused_flops_and_params_match_paper(name):
    res, mflops, params, params_fused = SHVIT[name]
    report = count_flops(name)
    assert report.input_size == (3, res, res)
    assert report.fused
    assert round(report.total / 1e6, 2) == mflops
    assert report.params == params
    assert report.params_fused == params_fused


def test_shvit_unfused_count_and_uncounted_ops_reported():
    report = count_flops("shvit_s1", fused=False)
    assert round(report.total / 1e6, 2) == 244.11  # reference shvit.md §6.2, fvcore on the unfused model
    assert report.by_operator["batch_norm"] > 0
    # 9 attention blocks (4 in stage 2, 5 in stage 3), one softmax each; SE gate: sigmoid + mean twice
    assert report.uncounted["aten::softmax"] == 9
    assert report.uncounted["aten::sigmoid"] == 2
    assert report.uncounted["aten::mean"] == 2
    assert report.uncounted.get("aten::add", 0) + report.uncounted.get("aten::add_", 0) > 0  # residuals
    assert not any(op.endswith(("reshape_as", "view_as")) for op in report.uncounted)  # free shape ops
    assert "aten::softmax" in report.summary()


def test_deit_base_matches_paper_and_counts_sdpa():
    report = count_flops("deit_base_patch16_224")
    assert round(report.total / 1e9, 4) == 17.5827  # cited as 17.6G (DeiT, NViT Table 1)
    # 12 blocks x 12 heads x (197 x 197) x (64 + 64): QK^T and AV
    assert report.by_operator["scaled_dot_product_attention"] == 12 * 12 * 197 * 197 * (64 + 64)
    assert "aten::scaled_dot_product_attention" not in report.uncounted
    assert report.params == report.params_fused == 86_567_656


def test_sdpa_handle_equals_fvcore_matmul_count_of_explicit_attention():
    fused = timm.create_model("deit_tiny_patch16_224")
    explicit = timm.create_model("deit_tiny_patch16_224")
    explicit.load_state_dict(fused.state_dict())
    for block in explicit.blocks:
        block.attn.fused_attn = False  # q @ k^T and attn @ v as aten::matmul, which fvcore counts itself
    a, b = count_flops(fused), count_flops(explicit)
    assert "scaled_dot_product_attention" in a.by_operator and "scaled_dot_product_attention" not in b.by_operator
    assert a.by_operator["scaled_dot_product_attention"] == b.by_operator["matmul"]
    assert a.total == b.total


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1, bias=False)

    def forward(self, x):
        y = self.conv(x)
        y = F.gelu(y) + y
        return y.softmax(1).mean((2, 3))


def test_elementwise_option_counts_one_per_element():
    model = _Tiny()
    elements = 2 * 5 * 4 * 4  # batch 2, 5 channels, 4x4
    conv = elements * 3  # 1x1 conv over 3 input channels
    default = count_flops(model, (3, 4, 4), batch_size=2)
    assert default.total == conv
    assert default.uncounted == {"aten::gelu": 1, "aten::add": 1, "aten::softmax": 1, "aten::mean": 1}
    full = count_flops(model, (3, 4, 4), batch_size=2, elementwise=True)
    assert full.total == conv + 4 * elements  # gelu, add, softmax per output element; mean per input element
    assert full.uncounted == {}


def test_model_left_unchanged_and_breakdown_consistent():
    model = timm.create_model("shvit_s1").train()
    before = count_params(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    report = count_flops(model, 128)
    assert model.training and count_params(model) == before
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    assert report.input_size == (3, 128, 128)
    assert report.by_module[""] == report.total
    top = [n for n in report.by_module if n and "." not in n]
    assert sum(report.by_module[n] for n in top) == report.total
    table = report.table(max_depth=1)
    assert "patch_embed" in table and "stages.0" not in table
    assert "stages.0" in report.table(max_depth=2)


def test_bad_inputs_raise_helpful_errors():
    with pytest.raises(TypeError, match="nn.Module or a timm model name"):
        count_flops(42)
    with pytest.raises(ValueError, match="input_size"):
        count_flops(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="input_size"):
        count_flops(nn.Conv2d(3, 3, 1), (1, 2, 3, 4))
    with pytest.raises(ValueError, match="positive"):
        count_flops(nn.Conv2d(3, 3, 1), 0)
    with pytest.raises(ValueError, match="closest matches"):
        count_flops("shvit_s9")


def test_an_input_the_model_rejects_raises_its_error_not_a_count():
    # SHViT skips its input checks while traced (fvcore counts on a trace), so only an eager call catches these
    model = timm.create_model("shvit_s1")
    with pytest.raises(ValueError, match="built for 3 input channels"):
        count_flops(model, (4, 224, 224))
    assert count_flops(model, 64).total > 0
    with pytest.raises(AssertionError, match="Input height \\(17\\) doesn't match model \\(224\\)"):
        count_flops(timm.create_model("deit_tiny_patch16_224"), 17)  # a fixed-size ViT at another size


@pytest.mark.parametrize("name", sorted(REVIT))
def test_revit_flops_match_formula(name):
    emb, heads, qk, mlp, paper_g = REVIT[name]
    model = timm.create_model(name)
    tokens = 196 + model.num_prefix_tokens
    classifiers = 2 if isinstance(getattr(model, "head_dist", None), nn.Linear) else 1
    report = count_flops(model)
    assert report.input_size == (3, 224, 224)
    macs = sum(v for k, v in report.by_operator.items() if k in MAC_OPS)
    assert macs == vit_macs(emb, heads, qk, mlp, tokens, classifiers)
    assert report.total == pytest.approx(paper_g * 1e9, rel=0.01)


def test_plain_conv_bn_pairs_are_folded_like_torch_fx_fuse():
    """ResNet's Conv2d -> BatchNorm2d pairs have no fuse(): the fused count folds them anyway. Reference: PyTorch's
    own Conv+BN folding (torch.fx.experimental.optimization.fuse) counted by fvcore directly."""
    from fvcore.nn import FlopCountAnalysis
    from torch.fx.experimental.optimization import fuse

    model = timm.create_model("resnet18").eval()
    reference = fuse(model)
    x = torch.randn(1, 3, 96, 96)
    analysis = FlopCountAnalysis(reference, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    report = count_flops(model, 96)
    assert report.total == analysis.total()
    assert "batch_norm" not in report.by_operator
    assert report.params_fused == count_params(reference) < report.params


def test_timm_batchnorm_act_folded_and_only_the_norm_removed():
    """MobileNetV3's BatchNormAct2d: the fused count is the unfused one minus fvcore's batch_norm count, exactly."""
    unfused = count_flops("mobilenetv3_small_050", 64, fused=False)
    fused = count_flops("mobilenetv3_small_050", 64)
    assert fused.total == unfused.total - unfused.by_operator["batch_norm"]
    assert "batch_norm" not in fused.by_operator


def test_bn_whose_conv_output_is_also_used_elsewhere_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding the norm into conv would change the second use

    model = Shared().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    report = count_flops(model, (3, 8, 8))
    assert report.by_operator["batch_norm"] > 0 and report.params_fused == report.params
    from vitzoo import deploy
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(deploy(model, x)(x), model(x), atol=1e-5, rtol=0)


def test_fvcore_silent_arithmetic_is_reported_or_counted():
    """fvcore's ignore list drops relu/clamp/max without a word; they are listed, or counted with elementwise."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Hardtanh(0.0, 6.0))
    elements = 4 * 5 * 5
    default = count_flops(model, (3, 5, 5))
    assert default.total == elements * 3
    assert default.uncounted == {"aten::relu": 1, "aten::hardtanh": 1}
    full = count_flops(model, (3, 5, 5), elementwise=True)
    assert full.by_operator["relu"] == full.by_operator["hardtanh"] == elements and full.uncounted == {}


def test_sdpa_handle_counts_broadcast_batch():
    """q of batch 1 against k/v of batch 3: three attentions, 3*2*5*20*(8+8) MACs (hand count)."""
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Parameter(torch.randn(1, 2, 5, 8))

        def forward(self, x):
            kv = x.reshape(3, 2, 20, 8)
            return F.scaled_dot_product_attention(self.q, kv, kv)

    assert count_flops(Broadcast(), (2, 20, 8), batch_size=3).total == 3 * 2 * 5 * 20 * (8 + 8)


def test_in_chans_comes_from_the_model_not_its_cfg():
    """timm leaves pretrained_cfg['input_size'] at 3 channels for in_chans=1: the model's own count is used."""
    from vitzoo import deploy

    model = timm.create_model("resnet18", in_chans=1, num_classes=4)
    assert count_flops(model).input_size == (1, 224, 224)
    by_int = count_flops(model, 32)
    assert by_int.input_size == count_flops(model, (32, 32)).input_size == (1, 32, 32)
    assert by_int.total == count_flops(model, (1, 32, 32)).total
    assert deploy(model.eval())(torch.randn(2, 1, 224, 224)).shape == (2, 4)
