"""vitzoo.flops against published numbers, hand-derived formulas and fvcore's own matmul handle."""
import copy
import string

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitzoo.flops import count_flops, count_params

from formulas import MAC_OPS, REVIT, layer_norm_flops, vit_macs  # tests/formulas.py

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
    with pytest.raises(ValueError, match=r"^Conv2d has no pretrained_cfg\['input_size'\]; pass input_size="):
        count_flops(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match=r"^input_size must be an int, \(H, W\) or \(C, H, W\) of positive ints, "
                                         r"got \(1, 2, 3, 4\)$"):
        count_flops(nn.Conv2d(3, 3, 1), (1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"^input_size must be an int, .* of positive ints, got 0$"):
        count_flops(nn.Conv2d(3, 3, 1), 0)
    with pytest.raises(ValueError, match="closest matches"):
        count_flops("shvit_s9")


def test_input_size_of_numpy_ints_is_taken_and_of_floats_refused():
    """Found by an audit: a numpy int (a size read from an array or a config) raised "'numpy.int64' object is not
    iterable", and a float or True slipped through to a 1x1 input or the model's own shape error."""
    np = pytest.importorskip("numpy")
    conv = nn.Conv2d(3, 8, 3)  # 3*8*9 MACs per output pixel; 62x62 outputs on a 64x64 input
    expected = 3 * 8 * 9 * 62 * 62
    for size in (np.int64(64), torch.tensor(64), (np.int32(64), 64), (3, np.int64(64), 64)):
        assert count_flops(conv, size, fused=False).total == expected, size
    for size in (64.0, True, "64", (64.0, 64), (3, 64, True)):
        with pytest.raises(ValueError, match=r"input_size must be an int, \(H, W\) or \(C, H, W\) of positive ints"):
            count_flops(conv, size)
    assert count_flops("vit_tiny_patch16_224", np.int64(160)).input_size == (3, 160, 160)


def test_an_input_the_model_rejects_raises_its_error_not_a_count():
    # SHViT skips its input checks while traced (fvcore counts on a trace), so only an eager call catches these
    model = timm.create_model("shvit_s1")
    with pytest.raises(ValueError, match="takes 3-channel input"):
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


def test_model_built_for_another_fixed_size_is_counted_at_that_size():
    """timm leaves pretrained_cfg at 224 when a ViT is built with img_size=(48, 80); such a model refuses 224x224,
    so the default size is the one its patch embedding was built for (3 x 5 patches). Reference: the formula."""
    emb, heads, qk, mlp, _ = REVIT["revit_t"]
    model = timm.create_model("revit_t", img_size=(48, 80))
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    report = count_flops(model)
    assert report.input_size == (3, 48, 80)
    macs = sum(v for k, v in report.by_operator.items() if k in MAC_OPS)
    assert macs == vit_macs(emb, heads, qk, mlp, 15 + model.num_prefix_tokens, 2, patches=15)
    from vitzoo import deploy

    deit = timm.create_model("deit_tiny_patch16_224", img_size=(48, 80))
    assert count_flops(deit).input_size == (3, 48, 80)
    assert deploy(deit.eval())(torch.randn(1, 3, 48, 80)).shape == (1, 1000)
    # a plain module with a fixed-size patch embedding and no in_chans attribute: channels from its first conv
    from timm.layers import PatchEmbed

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = PatchEmbed(img_size=32, patch_size=8, in_chans=1, embed_dim=16)

        def forward(self, x):
            return self.patch_embed(x).mean(1)

    tiny = count_flops(Tiny(), 32)
    assert tiny.input_size == (1, 32, 32) and tiny.total == 16 * 8 * 8 * 16  # 4x4 patches of 8x8x1 -> 16
    assert count_flops(Tiny()).input_size == (1, 32, 32)
    # a ViT that accepts any size keeps the cfg's
    assert count_flops(timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True)).input_size == (3, 224, 224)


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


def test_non_square_cfg_input_size_keeps_height_then_width():
    """pretrained_cfg input_size is (C, H, W); a non-square one is used as is, with the model's own in_chans."""
    from vitzoo.models import model_input_size

    model = timm.create_model("resnet18", num_classes=4, pretrained_cfg_overlay=dict(input_size=(3, 64, 96)))
    assert model_input_size(model) == count_flops(model).input_size == (3, 64, 96)
    gray = timm.create_model("resnet18", in_chans=1, num_classes=4, pretrained_cfg_overlay=dict(input_size=(3, 64, 96)))
    assert model_input_size(gray) == (1, 64, 96)


# ---- ops beyond fvcore's handles (found by an audit); references: torch.utils.flop_counter (2 per multiply-add,
# ---- run on the eager model, so independent of the jit trace fvcore counts) and hand formulas


def _flop_counter_macs(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


class _Recurrent(nn.Module):
    """LSTM (2 layers, bidirectional, projected), GRU and ReLU-RNN over the image rows."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True, proj_size=4)
        self.gru = nn.GRU(8, 16)
        self.rnn = nn.RNN(8, 12, nonlinearity="relu")

    def forward(self, x):
        x = x.flatten(1, 2)
        return self.lstm(x)[0].sum() + self.gru(x)[0].sum() + self.rnn(x)[0].sum()


def test_recurrent_layers_are_counted():
    """Before, aten::lstm / gru counted 0 (sequencer2d_s: 4.96 G instead of the paper's 8.4 G)."""
    model = _Recurrent().eval()
    report = count_flops(model, (3, 8, 8), batch_size=2)
    assert report.total == _flop_counter_macs(model, torch.randn(2, 3, 8, 8)) == 226_560
    assert not report.unknown_ops


def test_sequencer_matches_its_paper():
    assert count_flops("sequencer2d_s").total / 1e9 == pytest.approx(8.4, rel=0.01)  # Sequencer paper, Table 1


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_convolutions_are_counted(padding):
    """``padding='same'`` / ``'valid'`` trace as aten::_convolution_mode, which counted 0 (ConvMixer: -5.9%)."""
    conv = nn.Conv2d(3, 16, 3, padding=padding)
    explicit = nn.Conv2d(3, 16, 3, padding=1 if padding == "same" else 0)
    expected = count_flops(explicit, (3, 32, 32)).total  # fvcore's own conv handle
    assert expected == 16 * 27 * (32 * 32 if padding == "same" else 30 * 30)
    assert count_flops(conv, (3, 32, 32)).by_operator == {"conv": expected}


class _TorchAttention(nn.Module):
    def __init__(self, encoder: bool):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(48, 4, 96, batch_first=True), 2) \
            if encoder else None
        self.mha = nn.MultiheadAttention(48, 4, batch_first=True)

    def forward(self, x):
        t = x.flatten(2).transpose(1, 2)
        if self.encoder is not None:
            return self.encoder(t)
        return self.mha(t, t, t)[0]


@pytest.mark.parametrize("encoder", [False, True])
def test_torch_attention_modules_are_counted(encoder):
    """Without grad (how count_flops traces) both run a fused fast-path op that counted 0."""
    model = _TorchAttention(encoder).eval()
    report = count_flops(model, (48, 8, 8))
    tokens, dim = 64, 48
    mha = tokens * dim * 3 * dim + tokens * dim * dim + tokens * tokens * dim * 2  # qkv, out proj, QK^T and AV
    ffn = tokens * dim * 96 * 2
    assert report.by_operator.get("linear", 0) + report.by_operator.get("scaled_dot_product_attention", 0) \
        + report.by_operator.get("matmul", 0) + report.by_operator.get("bmm", 0) \
        == (2 * (mha + ffn) if encoder else mha)
    assert not report.unknown_ops


class _Products(nn.Module):
    def forward(self, x):  # x: [1, 3, 32, 32]
        v = x[0, 0, 0]
        return ((x[0, 0] @ x[0]).sum() + (x.flatten(2) @ v.repeat(32)).sum()  # broadcast batch; 1-D right operand
                + torch.baddbmm(x[0], x[0], x[0]).sum() + torch.addmv(v, x[0, 0], v).sum())


def test_matrix_products_with_broadcasting_and_vectors():
    """fvcore's matmul handle counted ``x[0] @ x`` with a batch of 1 and failed on a 1-D right operand."""
    report = count_flops(_Products(), (3, 32, 32))
    # (32, 32) @ (3, 32, 32); (1, 3, 1024) @ (1024,); baddbmm of (3, 32, 32) x (3, 32, 32); addmv (32, 32) x (32,)
    # (torch.utils.flop_counter has no formula for the matrix-vector products, so it is no reference here)
    assert report.by_operator == {"matmul": 3 * 32 ** 3 + 3 * 1024, "baddbmm": 3 * 32 ** 3, "addmv": 32 * 32}


def test_fused_attention_elementwise_count_equals_the_explicit_path():
    """With ``elementwise=True``, SDPA's scaling and softmax were neither counted nor listed. Both paths are checked
    against the hand count: ViT-S/16's MACs, its LayerNorms, and one per element of the position-embedding add, q's
    scaling, the softmax over 197 x 197 scores, the two residual adds and the GELU."""
    tokens, emb, heads, blocks, mlp = 197, 384, 6, 12, 1536
    per_block = heads * tokens * 64 + heads * tokens * tokens + 2 * tokens * emb + tokens * mlp
    by_hand = (vit_macs(emb, [heads] * blocks, [64] * blocks, [mlp] * blocks, tokens, classifiers=1)
               + layer_norm_flops(blocks, tokens, emb) + tokens * emb + blocks * per_block)
    fused = count_flops("vit_small_patch16_224", fused=False, elementwise=True).total
    with _fused_attn(False):
        explicit = count_flops(timm.create_model("vit_small_patch16_224"), fused=False, elementwise=True).total
    assert fused == explicit == by_hand == 4_617_562_632  # the figure of docs/flops-and-compare.md


def _fused_attn(enabled: bool):
    import contextlib

    @contextlib.contextmanager
    def ctx():
        from timm.layers import config

        before = config._USE_FUSED_ATTN
        timm.layers.set_fused_attn(enabled)
        try:
            yield
        finally:
            config._USE_FUSED_ATTN = before
    return ctx()


def test_tf_same_padding_convs_fold_their_batchnorm():
    """timm's Conv2dSame (tf_efficientnet_*) kept its BatchNorm in the fused count: 1.79 M MACs more than
    efficientnet_b0, the same network with symmetric padding."""
    same, plain = count_flops("tf_efficientnet_b0"), count_flops("efficientnet_b0")
    assert "batch_norm" not in same.by_operator
    assert same.total == plain.total and same.params_fused == plain.params_fused


def test_a_named_fixed_size_model_is_built_for_the_size_asked():
    """``count_flops("vit_small_patch16_224", 384)`` failed with the model's 'doesn't match model (224)'."""
    expected = count_flops(timm.create_model("vit_small_patch16_224", img_size=384), 384).total
    assert count_flops("vit_small_patch16_224", 384).total == expected
    assert round(expected / 1e9, 1) == 15.5  # DeiT-S at 384, DeiT paper Table 1 / timm deit_small_patch16_384
    assert count_flops("vit_small_patch16_224", (224, 320)).input_size == (3, 224, 320)


def test_ops_without_a_formula_are_named():
    class TopK(nn.Module):
        def forward(self, x):
            return torch.topk(x.flatten(1), 3).values + x.mean()

    report = count_flops(TopK(), (3, 8, 8))
    assert report.unknown_ops == {"aten::topk": 1}  # aten::mean and aten::add are elementwise, by convention
    assert "no FLOP formula (their work is missing from the total): aten::topk x1" in str(report)


def _efficientnet_b0_conv_macs() -> int:
    """EfficientNet-B0's convolutions by hand from the paper's Table 1 (expansion, kernel, stride, channels,
    repeats per stage): stem, MBConv expand / depthwise / squeeze-excite (to a quarter of the block's input
    channels, on a 1x1 map) / project, and the 1x1 head conv to 1280."""
    size, channels = 112, 32
    total = size * size * channels * 3 * 3 * 3
    for expand, kernel, stride, out, repeats in [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2),
                                                 (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
                                                 (6, 3, 1, 320, 1)]:
        for i in range(repeats):
            mid, out_size = channels * expand, size // (stride if i == 0 else 1)
            total += size * size * channels * mid if expand != 1 else 0
            total += out_size * out_size * mid * kernel * kernel + 2 * mid * (channels // 4)
            total += out_size * out_size * mid * out
            channels, size = out, out_size
    return total + size * size * channels * 1280


def test_convmixer_and_half_precision_figures_of_the_docs():
    """docs/flops-and-compare.md: ConvMixer-768/32 20.78 G (its depthwise convs use padding='same'): 20.68 G of
    convs by hand, plus 0.10 G of BatchNorm (it follows an activation, so it is not folded; fvcore: 2 per element
    in eval), the global pool (1 per element) and the classifier; resnet18 in fp16 (BatchNorm not folded)
    1,819.07 M against 1,814.10 M in fp32; tf_efficientnet_b0 385.88 M, by hand from the paper's table."""
    convmixer = count_flops("convmixer_768_32")
    # hand count of the convs: a 7x7 stride-7 patch stem (32x32 tokens), then 32 x (7x7 depthwise + 1x1)
    tokens = 32 * 32
    convs = tokens * 768 * 3 * 7 * 7 + 32 * tokens * (768 * 7 * 7 + 768 * 768)
    assert convmixer.by_operator["conv"] == convs
    batch_norms = (1 + 2 * 32) * tokens * 768 * 2  # the stem's, then two per layer
    assert convmixer.total == convs + batch_norms + tokens * 768 + 768 * 1000
    assert round(convmixer.total / 1e9, 2) == 20.78
    half, full = count_flops(timm.create_model("resnet18").half()).total, count_flops("resnet18").total
    # the unfolded BatchNorms at 2 per element: the stem's (64 x 112^2), then per stage four plus the downsample's
    bn_elements = 64 * 112 ** 2 + 4 * 64 * 56 ** 2 + 5 * 128 * 28 ** 2 + 5 * 256 * 14 ** 2 + 5 * 512 * 7 ** 2
    assert half - full == 2 * bn_elements
    assert (round(half / 1e6, 2), round(full / 1e6, 2)) == (1819.07, 1814.10)
    effnet = count_flops("tf_efficientnet_b0")
    assert effnet.total == _efficientnet_b0_conv_macs() + 7 * 7 * 1280 + 1280 * 1000  # + pool + classifier
    assert round(effnet.total / 1e6, 2) == 385.88


# ---- hand counts for handles the tests above leave ambiguous (non-square operands, L != S, per-mode constants)


class _Attention(nn.Module):
    """q [B=3, H=2, L=5, E=8] from the input against k [3, 2, S=7, 8], v [3, 2, 7, Ev=6]: no two sizes equal."""

    def __init__(self, mask: str, explicit: bool = False):
        super().__init__()
        self.mask, self.explicit = mask, explicit
        self.k = nn.Parameter(torch.randn(3, 2, 7, 8))
        self.v = nn.Parameter(torch.randn(3, 2, 7, 6))
        self.bias = nn.Parameter(torch.randn(5, 7))  # additive float mask, broadcast over batch and heads
        self.register_buffer("hidden", torch.ones(5, 7, dtype=torch.bool).triu(1))  # is_causal, top-left aligned

    def forward(self, q):
        if not self.explicit:
            mask = self.bias if self.mask == "add" else None
            return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask, is_causal=self.mask == "causal")
        scores = (q * 8 ** -0.5) @ self.k.transpose(-2, -1)
        if self.mask == "add":
            scores = scores + self.bias
        elif self.mask == "causal":
            scores = scores.masked_fill(self.hidden, float("-inf"))
        return scores.softmax(-1) @ self.v


@pytest.mark.parametrize("mask", ["none", "add", "causal"])
def test_sdpa_elementwise_count_with_mask_and_cross_attention(mask):
    """Hand count with L=5 != S=7 and E=8 != Ev=6: matmuls B*H*L*S*(E+Ev), scaling q one per element of q
    (B*H*L*E, not of k), softmax one per score and the mask (added or filled) one more per score."""
    b, h, L, s, e, ev = 3, 2, 5, 7, 8, 6
    scores = b * h * L * s
    expected = scores * (e + ev) + b * h * L * e + scores * (2 if mask != "none" else 1)
    assert expected == {"none": 3390, "add": 3600, "causal": 3600}[mask]
    fused = _Attention(mask)
    explicit = _Attention(mask, explicit=True)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(3, 2, 5, 8)
    torch.testing.assert_close(explicit(x), fused(x), atol=1e-5, rtol=1e-5)  # the same maths
    assert count_flops(fused, (2, 5, 8), batch_size=3, elementwise=True).total == expected
    # the explicit path, counted op by op (mul, matmul, add / masked_fill, softmax, matmul), gives the same number
    assert count_flops(explicit, (2, 5, 8), batch_size=3, elementwise=True).total == expected
    # without elementwise ops only the two products count
    assert count_flops(fused, (2, 5, 8), batch_size=3).total == scores * (e + ev)


class _NonSquareProducts(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.a = nn.Parameter(torch.randn(2, 3, 4))
        self.b = nn.Parameter(torch.randn(2, 4, 5))
        self.c = nn.Parameter(torch.randn(2, 3, 5) if op == "baddbmm" else torch.randn(3, 5))

    def forward(self, x):
        return getattr(torch, self.op)(self.c, self.a, self.b)


@pytest.mark.parametrize("op", ["baddbmm", "addbmm"])
def test_batched_products_with_non_square_operands(op):
    """a [2, 3, 4] @ b [2, 4, 5]: 2 batches x (3 x 5) outputs x 4 multiply-adds = 120, whether the batches are kept
    (baddbmm, added to c [2, 3, 5]) or summed (addbmm, added to c [3, 5]); the addition is not counted."""
    report = count_flops(_NonSquareProducts(op), (3, 4, 4))
    assert report.total == 2 * 3 * 4 * 5 == 120
    assert report.by_operator == {op: 120}


@pytest.mark.parametrize("mode, dims, per_output", [
    ("bicubic", 2, 16),  # 4 x 4 input points per output element
    ("trilinear", 3, 8),  # 2 x 2 x 2
    ("linear", 1, 2),
    ("nearest", 1, 1),
    ("nearest-exact", 1, 1), ("nearest-exact", 2, 1), ("nearest-exact", 3, 1),  # before 2026-11-26: not counted
])
def test_interpolation_modes_count_their_documented_points_per_output(mode, dims, per_output):
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode=mode)

        def forward(self, x):  # x: [2, 3, 4, 6]
            if dims == 1:
                x = x.flatten(2)  # [2, 3, 24]
            elif dims == 3:
                x = x.unsqueeze(2)  # [2, 3, 1, 4, 6]
            return self.up(x)

    outputs = {1: 2 * 3 * 48, 2: 2 * 3 * 8 * 12, 3: 2 * 3 * 2 * 8 * 12}[dims]
    assert Up()(torch.randn(2, 3, 4, 6)).numel() == outputs
    report = count_flops(Up(), (3, 4, 6), batch_size=2)
    assert report.total == per_output * outputs
    assert not report.unknown_ops


def test_bilinear_layer_counts_both_input_features():
    """nn.Bilinear(4, 5, 6) at batch 3: each of the 3 x 6 outputs is x1^T W_o x2, 4 x 5 multiply-adds; the bias
    addition is not counted (as for Linear)."""
    class Bi(nn.Module):
        def __init__(self):
            super().__init__()
            self.bi = nn.Bilinear(4, 5, 6)

        def forward(self, x):  # x: [3, 1, 1, 9]
            return self.bi(x[:, 0, 0, :4], x[:, 0, 0, 4:])

    report = count_flops(Bi(), (1, 1, 9), batch_size=3)
    assert report.total == 3 * 6 * 4 * 5 == 360
    assert report.by_operator == {"bilinear": 360}


def test_max_reduction_counts_one_per_input_element():
    """torch.max(x) over all of x [2, 3, 4, 5]: 120 comparisons for one output element; the elementwise max of
    two equal shapes, one per element (120 more)."""
    class Max(nn.Module):
        def __init__(self):
            super().__init__()
            self.other = nn.Parameter(torch.randn(2, 3, 4, 5))

        def forward(self, x):
            return x.max(), torch.max(x, self.other)

    report = count_flops(Max(), (3, 4, 5), batch_size=2, elementwise=True)
    assert report.total == report.by_operator["max"] == 120 + 120
    assert count_flops(Max(), (3, 4, 5), batch_size=2).uncounted == {"aten::max": 2}


def test_batchnorm_after_one_of_two_calls_of_a_conv_is_not_paired():
    """The conv runs twice and the norm follows only its first call: folding would apply the norm to the second
    call as well, so no pair may be found, and fold_batchnorms leaves the model (and its output) as it is."""
    from vitzoo.batchnorm_folding import _find_pairs, fold_batchnorms

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(self.conv(x)))

    model = Twice().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6)
    pairs, output, unfolded = _find_pairs(model, x)
    assert pairs == {} and unfolded == {"bn": "conv also runs without this BatchNorm after it"}
    folded, n = fold_batchnorms(model, x)
    assert n == 0 and folded is model
    torch.testing.assert_close(folded(x), model(x), atol=0, rtol=0)
    report = count_flops(model, (4, 6, 6))
    assert report.by_operator["batch_norm"] > 0 and report.params_fused == report.params


def _randomise_batchnorms(model: nn.Module) -> nn.Module:
    """Trained-like BatchNorm statistics and affine parameters (a fresh BatchNorm is nearly the identity)."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
    return model


class _SecondConvShared(nn.Module):
    """A foldable pair (c1, b1), then a conv whose output feeds both its norm and the residual (MaxViT's stem.conv2,
    FastViT-MCi's pos_emb conv)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.c2(self.b1(self.c1(x)))
        return self.b2(y) + y


@pytest.mark.parametrize("trained", [False, True])
def test_a_conv_output_used_twice_keeps_its_norm_and_the_other_pairs_fold(trained):
    """Found by an audit: with fresh statistics the shared pair was folded (its output check passed, the norm being
    nearly the identity), with trained ones the check failed and every pair was left, b1 included. Hand count at
    32x32: convs 3*9 -> 8 and 8*9 -> 8 per pixel, b2 at fvcore's 2 per element; b1's 16 parameters folded."""
    model = _SecondConvShared().eval()
    if trained:
        _randomise_batchnorms(model)
    report = count_flops(model, (3, 32, 32))
    pixels = 32 * 32
    assert report.by_operator == {"conv": pixels * 8 * (3 * 9 + 8 * 9), "batch_norm": 2 * 8 * pixels}
    assert report.params_fused == report.params - 16 == 824
    assert report.unfolded_norms == {
        "b2": "the output or the weights of c2 are also used elsewhere, which folding would change"}
    assert "BatchNorm not folded (1, counted as batch_norm): b2: the output or the weights of c2" in str(report)
    from vitzoo import deploy

    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(deploy(model, x)(x), model(x), atol=1e-5, rtol=1e-5)


def test_maxvit_count_does_not_depend_on_its_batchnorm_statistics():
    """maxvit_nano_rw_256's stem.conv2 output feeds the first block's pre_norm and its shortcut: the pair was folded
    with fresh statistics and not with trained ones, and then no pair of the model was (4,433.71 M against
    4,456.12 M). Now the count is the same, and that norm is named."""
    fresh = timm.create_model("maxvit_nano_rw_256").eval()
    trained = _randomise_batchnorms(copy.deepcopy(fresh))
    a, b = count_flops(fresh), count_flops(trained)
    assert a.total == b.total and a.params_fused == b.params_fused
    assert a.unfolded_norms == b.unfolded_norms
    assert "stem.conv2" in a.unfolded_norms["stages.0.blocks.0.conv.pre_norm"]
    assert all("stem.conv2" not in why for name, why in a.unfolded_norms.items() if ".0.blocks.0." not in name)


class _WeightReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + F.conv2d(x, self.conv.weight, padding=1)  # the same weight, unnormalised


@pytest.mark.parametrize("trained", [False, True])
def test_a_conv_whose_weight_is_read_elsewhere_keeps_its_norm(trained):
    """Folding scales the conv's weight, which the second F.conv2d also reads. Hand count: two 3x3 convs 3 -> 4 at
    8x8, and the norm at 2 per element."""
    model = _WeightReused().eval()
    if trained:
        _randomise_batchnorms(model)
    report = count_flops(model, (3, 8, 8))
    assert report.by_operator == {"conv": 2 * 64 * 4 * 27, "batch_norm": 2 * 4 * 64}
    assert list(report.unfolded_norms) == ["bn"]


class _TokenNorm(nn.Module):
    """A Linear over the features of [B, N, C] tokens, then a BatchNorm1d, which on a 3-D input normalises dim 1:
    the N tokens, not the Linear's features."""

    def __init__(self, tokens: int, out: int):
        super().__init__()
        self.lin, self.bn = nn.Linear(16, out), nn.BatchNorm1d(tokens)

    def forward(self, x):
        return self.bn(self.lin(x[:, 0]))


@pytest.mark.parametrize("tokens, out, trained", [(16, 8, False), (16, 16, False), (16, 16, True)])
def test_a_batchnorm_over_a_linears_tokens_is_not_folded(tokens, out, trained):
    """Found by an audit: with 16 tokens and 8 features the fold crashed count_flops (fused or not: params_fused
    folds a copy) and deploy ("size of tensor a (8) must match ... (16)"); with 16 of each it folded with fresh
    statistics and not with trained ones. Hand count per image: the Linear 16 * 16 * out, the norm fvcore's 2 per
    element."""
    model = _TokenNorm(tokens, out).eval()
    if trained:
        _randomise_batchnorms(model)
    for fused in (False, True):
        report = count_flops(model, (1, tokens, 16), fused=fused)
        assert report.by_operator == {"linear": tokens * 16 * out, "batch_norm": 2 * tokens * out}
    assert report.unfolded_norms == {"bn": f"it normalises dim 1 of lin's {out}-feature output, not its features "
                                           "(a token dimension)"}
    assert report.params_fused == report.params
    from vitzoo import deploy

    x = torch.randn(2, 1, tokens, 16)
    torch.testing.assert_close(deploy(model, x)(x), model(x), atol=1e-5, rtol=1e-5)


class _HiddenUse(_SecondConvShared):
    """c2's output is also read through ``tolist()``, which no op records: only the output check can see it."""

    def forward(self, x):
        y = self.c2(self.b1(self.c1(x)))
        return self.b2(y) + torch.tensor(y.tolist())


def test_a_pair_that_changes_the_output_is_left_alone_and_the_others_fold():
    """The output check used to leave every pair unfolded when one pair changed the output."""
    from vitzoo.batchnorm_folding import fold_batchnorms, fold_batchnorms_detailed

    model = _randomise_batchnorms(_HiddenUse().eval())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        result = fold_batchnorms_detailed(model, x)
        assert result.folded == {"b1": "c1"}
        assert result.unfolded == {"b2": "folding it into c2 changed the model's output"}
        assert isinstance(result.model.b1, nn.Identity) and isinstance(result.model.b2, nn.BatchNorm2d)
        torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-5)
        assert fold_batchnorms(model, x)[1] == 1


def test_elementwise_op_on_scalars_counts_one():
    """Found by mutation testing: a 0-d result counted 0 (its empty shape was taken for an unknown one), so
    ``x.max() + x.sum()`` counted nothing for the add. Hand count: max 120 comparisons, add 1."""
    class Scalars(nn.Module):
        def forward(self, x):
            return x.max() + x.sum()

    report = count_flops(Scalars(), (3, 4, 5), batch_size=2, elementwise=True)
    assert report.by_operator["max"] == 120 and report.by_operator["add"] == 1


def test_data_movement_ops_are_free_not_unknown():
    """flip / roll / tile / meshgrid / pixel_shuffle / unfold move data only (seen in timm's SAM2-Hiera: tile,
    Qwen3-ViT: meshgrid): they count nothing and are not reported as ops without a formula. Hand count: the
    1x1 conv only, 8 x 4 x 16 x 16 = 8192 MACs."""
    class Moves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 1, bias=False)

        def forward(self, x):
            y = self.conv(x.flip(-1).roll(1, dims=2))
            gy, gx = torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")
            y = y.tile(1, 1, 1, 1) + (gy + gx).sum()
            return F.pixel_shuffle(y, 2), F.unfold(y, 2)

    report = count_flops(Moves(), (4, 16, 16))
    assert report.total == 8 * 4 * 16 * 16
    assert report.unknown_ops == {}, report.unknown_ops


def test_more_activations_and_reductions_count_one_per_element_and_gate_splits_are_free():
    """Found by an audit: F.relu6, SELU, CELU, LogSigmoid, Threshold, fmod, trunc, frac, exp2, log1p, atan2, erfinv,
    ``|``, var_mean and linalg.norm were reported without a formula even with elementwise=True, and the gate split of
    LSTMCell / GRUCell (unsafe_chunk) without one at all. Hand count: one per element of the 2 x 3 x 4 input for
    each; the cells' matrix products only: LSTMCell(4, 5) 20 x (4 + 5), GRUCell(4, 5) 15 x (4 + 5)."""
    class Ops(nn.Module):
        def forward(self, x):
            ys = [F.relu6(x), F.selu(x), F.celu(x), F.logsigmoid(x), F.threshold(x, 0.1, 0.), torch.fmod(x, 0.3),
                  x.trunc(), x.frac(), x.exp2(), x.log1p(), torch.atan2(x, x), torch.erfinv(x),
                  (x > 0) | (x < 0), torch.var_mean(x, dim=-1)[0]]
            return [*ys, torch.linalg.norm(x)]

    report = count_flops(Ops(), (2, 3, 4), elementwise=True)
    assert report.unknown_ops == {}, report.unknown_ops
    for op in ("relu6", "selu", "celu", "log_sigmoid", "threshold", "fmod", "trunc", "frac", "exp2", "log1p",
               "atan2", "erfinv", "__or__", "var_mean", "linalg_norm"):
        assert report.by_operator[op] == 24, op

    class Cells(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.gru = nn.LSTMCell(4, 5), nn.GRUCell(4, 5)

        def forward(self, x):
            x = x.flatten(1)
            return self.lstm(x)[0] + self.gru(x)

    report = count_flops(Cells(), (4, 1, 1))
    assert report.unknown_ops == {}, report.unknown_ops
    assert report.total == 20 * (4 + 5) + 15 * (4 + 5)


def test_transposes_views_and_selections_written_other_ways_are_free():
    """Found by an audit: ``x.T``, ``x.mT``, ``x.mH``, diagonal, index_select, tril / triu and ones_like were listed
    as ops without a FLOP formula ("their work is missing from the total"), though they do no arithmetic. Hand
    count: the two matmuls only, 2 x 5 x 5 x 12 + 5 x 12 x 5 = 900 MACs."""
    class Views(nn.Module):
        def forward(self, x):  # x: (1, 2, 5, 12)
            a = x @ x.mT + torch.ones_like(x[:, :, :, :5]).tril() - x[:, :, :, :5].triu()
            b = x[0, 0].mH.T.adjoint().T @ x[0, 0].T  # (5, 12) @ (12, 5)
            picked = x.index_select(3, torch.arange(3)).diagonal(dim1=2, dim2=3)
            return a.sum() + b.sum() + picked.sum()

    report = count_flops(Views(), (2, 5, 12))
    assert report.total == 2 * 5 * 5 * 12 + 5 * 12 * 5
    assert report.unknown_ops == {}, report.unknown_ops


def test_dot_tensordot_and_lookups_are_counted_by_hand():
    """Found by an audit: dot / tensordot counted 0 (reported without a formula), and channel_shuffle, embedding,
    one_hot (timm's gemma4_vit_167m) and real were reported without a formula though they do no arithmetic.
    Hand count: dot of two 64-vectors 64; tensordot of (4, 6, 8) and (8, 6, 4) over (6, 8) x (6, 8): 4 x 4 outputs
    x 48 = 768; the 1x1 conv 4 -> 8 at 4x4: 512."""
    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 1, bias=False)
            self.table = nn.Embedding(10, 3)

        def forward(self, x):  # x: (1, 4, 4, 4)
            v = x.flatten()
            a = torch.dot(v, v)
            b = torch.tensordot(x.reshape(4, 2, 8).repeat(1, 3, 1), x.reshape(8, 2, 4).repeat(1, 3, 1),
                                dims=([1, 2], [1, 0]))
            y = F.channel_shuffle(self.conv(x), 2)
            idx = (x[0, 0, 0] > 0).long()
            return a + b.sum() + y.sum() + self.table(idx).sum() + F.one_hot(idx, 2).sum() + torch.view_as_real(
                torch.complex(v, v)).real.sum()

    report = count_flops(Ops(), (4, 4, 4))
    assert report.by_operator == {"dot": 64, "tensordot": 4 * 4 * 6 * 8, "conv": 8 * 4 * 16}
    assert report.unknown_ops == {}, report.unknown_ops


def test_counting_inside_autocast_and_a_scripted_model():
    """Found by an audit: inside torch.autocast the trace failed with ~1,900 lines ("Cannot insert a Tensor that
    requires grad as a constant"); a torch.jit.script model gave "register_forward_hook is not supported". Hand
    count: conv 3 -> 8 (3x3, 8x8 output) 8 * 27 * 64 = 13,824, fvcore's pooling one per input element 512, and the
    linear 8 -> 4 32."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert count_flops(model, (3, 8, 8)).total == 8 * 27 * 64 + 8 * 64 + 32
    with pytest.raises(ValueError, match=r"^cannot count FLOPs of a TorchScript module \(RecursiveScriptModule, from "
                                         r"torch\.jit\.script / trace\).*Count the nn\.Module it was made from$"):
        count_flops(torch.jit.script(model), (3, 8, 8))


def test_a_compiled_block_is_counted_and_a_scripted_one_refused_by_name():
    """Found by an audit: a torch.compile'd or TorchScript submodule (not the whole model, which was handled) failed
    deep in the trace with torch's own words. Hand count: two 8 -> 8 linears on 2 tokens, 2 * 2 * 8 * 8 = 256."""
    class Two(nn.Module):
        def __init__(self, wrap):
            super().__init__()
            self.a, self.b = wrap(nn.Linear(8, 8)), nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x))

    model = Two(torch.compile)
    assert count_flops(model, (1, 2, 8)).total == 256
    assert type(model.a).__name__ == "OptimizedModule"  # the caller's model keeps its compiled block
    with pytest.raises(ValueError, match=r"^cannot count FLOPs of a model holding a TorchScript module \(a: "
                                         r"RecursiveScriptModule, from torch\.jit\.script / trace\)"):
        count_flops(Two(torch.jit.script), (1, 2, 8))


def test_the_example_takes_the_first_floating_point_tensor_s_dtype():
    """Found by an audit: the example input took the first parameter's dtype: int64 for a model holding an integer
    index table first (randn failed), float32 for a float64 model whose weights are buffers (the conv failed).
    Hand counts: 1x1 conv 3 -> 4 on 8x8: 4 * 3 * 64 = 768; 3x3 conv 3 -> 8 on 8x8 without padding: 8 * 27 * 36."""
    class Index(nn.Module):
        def __init__(self):
            super().__init__()
            self.order = nn.Parameter(torch.tensor([2, 1, 0]), requires_grad=False)
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x[:, self.order])

    class Buffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(8, 3, 3, 3, dtype=torch.float64))

        def forward(self, x):
            return F.conv2d(x, self.w)

    assert count_flops(Index(), (3, 8, 8)).total == 4 * 3 * 64
    assert count_flops(Buffers(), (3, 8, 8)).total == 8 * 27 * 36


def test_linear_with_a_vector_weight():
    """Found by an audit: fvcore's linear handle multiplies the input's elements by the weight's first dim, which
    for a 1-D weight is the input width again. The example is (1, 1, 4, 6). Hand count: 4 tokens of 6 dotted with a
    6-vector, 4 * 6 = 24; and the 4 tokens through a 6 -> 5 weight, 4 * 5 * 6 = 120."""
    class Score(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.v = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(5, 6))

        def forward(self, x):
            return F.linear(x, self.w), F.linear(x[0, 0], self.v)

    assert count_flops(Score(), (1, 4, 6)).by_operator == {"linear": 4 * 6 + 4 * 5 * 6}


def test_fused_table_model_row_shows_the_fused_params():
    report = count_flops("shvit_s1")
    model_row = report.table(max_depth=0).splitlines()[2].split()
    assert model_row == ["model", "6.309M", "241.400M"]  # 6,308,660 fused params (not 6,330,808), 241,400,128 MACs
    assert report.module_params[""] == report.params_fused == 6_308_660


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)  # 15 params; on (1, 3, 2, 4): 3*2 rows x 4*3 = 72 MACs
        self.b = nn.Sequential(nn.Linear(3, 2))  # 8 params; 3*2 rows x 3*2 = 36 MACs

    def forward(self, x):
        return self.b(self.a(x))


def test_table_lines_for_a_hand_built_model():
    report = count_flops(_TwoLinears(), (3, 2, 4), fused=False)
    assert report.total == 108 and report.params == 23
    assert report.table(max_depth=2).splitlines() == [
        "module  #params  FLOPs (MACs)",
        "-----------------------------",
        "model        23           108",
        "a            15            72",
        "b             8            36",
        "  b.0         8            36",
    ]
    assert report.table(max_depth=1).splitlines()[-1] == "b             8            36"


def test_human_units():
    from vitzoo.flops import _human

    assert _human(1_500_000) == "1.500M"
    assert _human(999) == "999"
    assert _human(1_000) == "1.000K"
    assert _human(12_345) == "12.345K"
    assert _human(2_000_000_000) == "2.000G"
    assert _human(-1_500_000) == "-1.500M"


@pytest.mark.parametrize("chans", [1, 4])
def test_a_named_model_is_built_for_the_channels_asked(chans):
    """``count_flops(name, (C, H, W))`` built the model with its default 3 channels and failed on C != 3."""
    report = count_flops("resnet18", (chans, 64, 64))
    assert report.input_size == (chans, 64, 64)
    assert report.by_module["conv1"] == 32 * 32 * 64 * 7 * 7 * chans  # stride-2 7x7 stem, 64 filters
    assert report.params == count_params(timm.create_model("resnet18")) + 64 * 7 * 7 * (chans - 3)


def test_a_named_vit_is_built_for_the_channels_and_size_asked():
    report = count_flops("deit_tiny_patch16_224", (1, 224, 224))
    assert report.input_size == (1, 224, 224)
    assert report.by_operator["conv"] == 196 * 192 * 16 * 16 * 1  # patch embed: 196 patches of 16x16x1 -> 192
    macs = sum(v for k, v in report.by_operator.items() if k in MAC_OPS)
    assert macs == vit_macs(192, [3] * 12, [64] * 12, [768] * 12, 197, 1) - 196 * 192 * 16 * 16 * 2
    assert count_flops("deit_tiny_patch16_224", (2, 32, 48)).by_operator["conv"] == 2 * 3 * 192 * 16 * 16 * 2


def test_channels_for_a_named_model_must_be_positive():
    from vitzoo.models import create

    with pytest.raises(ValueError, match=r"in_chans must be a positive int .* got 0"):
        create("resnet18", in_chans=0)


def test_levit_built_with_img_size_is_counted_at_that_size():
    """timm leaves LeViT's pretrained_cfg at 224 when it is built with ``img_size=256``; the count ran at 224 (and
    failed: its attention biases are for a 16x16 grid). Stem by hand: four stride-2 3x3 convs 3-16-32-64-128."""
    model = timm.create_model("levit_128s", img_size=256)
    report = count_flops(model)
    assert report.input_size == (3, 256, 256)
    assert report.by_module["stem"] == (128 ** 2 * 16 * 9 * 3 + 64 ** 2 * 32 * 9 * 16 + 32 ** 2 * 64 * 9 * 32
                                        + 16 ** 2 * 128 * 9 * 64)
    assert report.total == count_flops("levit_128s", 256).total  # built by name through timm's img_size


def test_pit_built_with_img_size_is_counted_at_that_size():
    report = count_flops(timm.create_model("pit_ti_224", img_size=256))
    assert report.input_size == (3, 256, 256)
    # 16x16 patches at stride 8: (256 - 16) / 8 + 1 = 31 per side, 3 channels -> 64
    assert report.by_module["patch_embed"] == 31 * 31 * 64 * 16 * 16 * 3


@pytest.mark.parametrize("name", ["efficientformerv2_s0", "mvitv2_tiny", "xcit_nano_12_p16_224"])
def test_fixed_size_models_built_with_img_size_are_counted_at_that_size(name):
    """EfficientFormerV2 failed at the cfg's 224; MViTv2 and XCiT were silently counted at 224."""
    report = count_flops(timm.create_model(name, img_size=256))
    assert report.input_size == (3, 256, 256)
    assert report.total == count_flops(name, 256).total


@pytest.mark.parametrize("name, kwargs", [
    ("shvit_s1", {}), ("resnet18", {}), ("efficientvit_m5", {}), ("deit_tiny_patch16_224", {}),
    ("deit_tiny_patch16_224", dict(img_size=256, dynamic_img_size=True)), ("levit_128s", {}),
])
def test_models_that_take_any_size_or_were_not_resized_keep_the_cfg_size(name, kwargs):
    from vitzoo.models import model_input_size

    assert model_input_size(timm.create_model(name, **kwargs)) == (3, 224, 224)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_compiled_module_is_counted_as_its_original():
    """count_flops on ``torch.compile(model)`` failed with a tracer error about dynamo-optimized functions."""
    model = _ConvNet().eval()
    report = count_flops(torch.compile(model), (3, 16, 16))
    assert report.total == 16 * 16 * 8 * 3 * 3 * 3 + 8 * 5  # 3x3 conv 3 -> 8 at 16x16, linear 8 -> 5
    assert report.params == count_params(model)


def test_a_data_parallel_wrapper_is_counted_as_its_module():
    """Found by an audit: ``nn.DataParallel(model)`` failed with "has no pretrained_cfg['input_size']" (the wrapper
    has no cfg) and, given a size, would count the wrapper's scatter. Hand count as above; timm's ResNet-18 by its
    cfg's size, as the bare model."""
    model = _ConvNet().eval()
    report = count_flops(nn.DataParallel(torch.compile(model)), (3, 16, 16))
    assert report.total == 16 * 16 * 8 * 3 * 3 * 3 + 8 * 5 and report.params == count_params(model)
    resnet = timm.create_model("resnet18")
    assert count_flops(nn.DataParallel(resnet)).total == count_flops(resnet).total


def test_a_pruned_model_gets_the_way_to_count_it():
    """Found by an audit: torch.nn.utils.prune's ``weight`` (computed with grad) cannot be deep-copied, and torch's
    error names weight_norm only. After a forward under no_grad it is a plain tensor: the count is then the
    dense count (pruning zeroes weights, fvcore counts shapes), by hand as above."""
    model = _ConvNet().eval()
    from torch.nn.utils import prune

    prune.l1_unstructured(model.conv, "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"torch\.nn\.utils\.prune.*Run the model once under torch\.no_grad\(\)"):
        count_flops(model, (3, 16, 16))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert count_flops(model, (3, 16, 16)).total == 16 * 16 * 8 * 3 * 3 * 3 + 8 * 5


def test_a_deployed_model_is_refused_with_what_to_count_instead():
    """A ``vitzoo.deploy``ed model failed with errors about tracing, OpaqueTensorImpl or pickling a session."""
    import vitzoo

    deployed = vitzoo.deploy(_ConvNet().eval(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"deployed by vitzoo.deploy \(backend 'eager'\): count the original model"):
        count_flops(deployed)


class _Resize(nn.Module):
    def __init__(self, mode, size):
        super().__init__()
        self.mode, self.size = mode, size

    def forward(self, x):
        return F.interpolate(x, size=self.size, mode=self.mode, antialias=True, align_corners=False)


@pytest.mark.parametrize("mode, points", [("bilinear", 4), ("bicubic", 16)])
@pytest.mark.parametrize("size", [(8, 8), (24, 40)])
def test_antialiased_interpolation_counts_as_without_antialiasing(mode, points, size):
    """``antialias=True`` runs ``aten::_upsample_{bilinear,bicubic}2d_aa``, which counted 0 and were unknown ops."""
    report = count_flops(_Resize(mode, size), (3, 16, 16))
    assert report.total == points * 3 * size[0] * size[1]  # 2x2 or 4x4 input points per output element
    assert report.unknown_ops == {}


def test_a_model_on_the_meta_device_is_a_clear_error():
    """Found by an audit: a model without its weights (built under torch.device('meta')) raised "Cannot copy out of
    meta tensor; no data!". Counting on meta was tried: torch 2.14's meta convolution fails under the trace (and
    BatchNorm folding checks values), so it is refused with what to do, naming the tensor."""
    with torch.device("meta"):
        model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"cannot count FLOPs of a model on the 'meta' device \(its parameter "
                                         r"'conv1.weight' is; the model is not materialised\).*Build it on the CPU"):
        count_flops(model, 32)
    with pytest.raises(ValueError, match=r"its parameter 'conv1.weight' is"):
        count_flops(model, 32, fused=False)


class _ReturnsExtras(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return {"logits": self.conv(x), "n": 3, "aux": (None, "name", x.shape[0])}


def test_an_output_holding_non_tensors_is_counted_on_its_tensors():
    """Found by an audit: a model returning {"logits": t, "n": 3} raised the tracer's "output 1 (3) of traced region
    did not have observable data dependence with trace inputs"."""
    report = count_flops(_ReturnsExtras(), (3, 16, 16))
    assert report.total == 3 * 8 * 3 * 3 * 14 * 14  # the conv alone: 3x3 kernel, 3 -> 8 channels, 14x14 outputs
    assert report.by_module == {"": report.total, "conv": report.total}


def test_a_batch_size_that_is_not_an_int_is_refused_before_the_model_is_built(monkeypatch):
    """Found by an audit: batch_size=2.0 built the named model, then failed in torch.randn with "received an
    invalid combination of arguments"; True passed the `< 1` check. Both are now refused up front, by name."""
    built = []
    monkeypatch.setattr("vitzoo.models.create", lambda *a, **k: built.append(a) or nn.Conv2d(3, 4, 1))
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match=rf"batch_size must be an int >= 1, got {bad!r} \({type(bad).__name__}\)"):
            count_flops("shvit_s1", 224, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        count_flops("shvit_s1", 224, batch_size=0)
    assert built == []
    assert count_flops("shvit_s1", (3, 2, 5), batch_size=3).total == 3 * 2 * 5 * 3 * 4  # 1x1 conv, 3 -> 4 channels


@pytest.mark.parametrize("pool", ["avg", "max", "token"])
def test_final_norm_after_pooling_is_counted_on_the_pooled_vectors(pool):
    """NViT's fc_norm (since 2026-11-25): the final LayerNorm after pooling costs 5 per pooled feature, not 5 per token
    feature; the count is the hand formula's, and the timm ViT's that the NViT was converted from."""
    import nvit

    blocks, tokens, emb, heads, mlp = 3, 197, 192, 3, 768
    vit = timm.create_model("vit_tiny_patch16_224", depth=blocks, num_classes=5, global_pool=pool)
    report, ref = count_flops(nvit.from_vit(vit)), count_flops(vit)
    final_norm = 5 * emb if pool != "token" else 5 * tokens * emb
    assert report.by_operator["layer_norm"] == ref.by_operator["layer_norm"] == \
        layer_norm_flops(blocks, tokens, emb) - 5 * tokens * emb + final_norm
    macs = sum(v for k, v in report.by_operator.items() if k in MAC_OPS)
    assert macs == vit_macs(emb, [heads] * blocks, [64] * blocks, [mlp] * blocks, tokens, 1, num_classes=5)
    assert report.total == ref.total


def test_distilled_nvit_with_fc_norm_counts_the_norm_on_both_pooled_tokens():
    """Class and distillation tokens each get the final norm after pooling: 2 * 5 * E instead of 5 * N * E."""
    dims = dict(embed_dim=32, heads=[2, 1, 3], qk_dim=[8, 16, 8], v_dim=[16, 8, 8], mlp_dim=[48, 32, 64])
    blocks, tokens, emb = 3, 16 + 2, 32
    model = timm.create_model("nvit_b", dims=dims, img_size=64, fc_norm=True)
    assert count_flops(model).by_operator["layer_norm"] == 2 * blocks * tokens * emb * 5 + 2 * 5 * emb


class _RmsNorm(nn.Module):
    def __init__(self, weight: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(6) + 0.5) if weight else None

    def forward(self, x):  # x: [2, 1, 4, 6], normalised over its last dim
        return F.rms_norm(x, (6,), self.weight)


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_counts_like_layer_norm_without_the_mean(weight):
    """Found by an audit: aten::rms_norm (timm's vit_dwee_patch16_reg1_gap_256, deepseek_vit_412m) had no formula.
    fvcore's layer_norm counts 5 per element with its affine, 4 without; RMSNorm has no mean to take and subtract
    (2 fewer), and a weight without a bias: 3 and 2 per element, counted by default like layer_norm."""
    elements = 2 * 1 * 4 * 6
    layer_norm = count_flops(nn.LayerNorm(6, elementwise_affine=weight), (1, 4, 6), batch_size=2)
    assert layer_norm.by_operator == {"layer_norm": (5 if weight else 4) * elements}  # fvcore's own handle
    report = count_flops(_RmsNorm(weight), (1, 4, 6), batch_size=2)
    per_element = 3 if weight else 2
    assert report.by_operator == {"rms_norm": layer_norm.total - 2 * elements} == {"rms_norm": per_element * elements}
    assert report.unknown_ops == {} and report.uncounted == {}
    if weight:
        from timm.layers import RmsNorm

        assert count_flops(RmsNorm(6), (1, 4, 6), batch_size=2).total == 3 * elements


class _Comparisons(nn.Module):
    """lt / le / ne, masked_fill_ and tanh_ (in place), glu and prelu; or their counted siblings gt / ge / eq,
    masked_fill and tanh (out of place), a product of halves and a leaky ReLU."""

    def __init__(self, siblings: bool):
        super().__init__()
        self.siblings = siblings
        self.slope = nn.Parameter(torch.tensor([0.25]))

    def forward(self, x):  # x: [2, 1, 4, 6], 48 elements
        if self.siblings:
            y = x.masked_fill(x.gt(0), 0.0).tanh()
            a, b = x.chunk(2, -1)
            return y, a * b, F.leaky_relu(x, 0.25), x.ge(0), x.eq(1)
        y = x.clone().masked_fill_(x.lt(0), 0.0).tanh_()
        return y, F.glu(x, -1), F.prelu(x, self.slope), x.le(0), x.ne(1)


def test_comparisons_in_place_ops_glu_and_prelu_count_like_their_siblings():
    """Found by an audit: with elementwise=True, lt / le / ne / masked_fill_ / tanh_ / glu / prelu were unknown ops
    while gt / ge / eq / masked_fill / tanh were counted. Hand count: one per output element, 48 for each op and
    24 for glu (the product of the two 3-wide halves): 6 * 48 + 24 = 312, what the siblings count."""
    report = count_flops(_Comparisons(False), (1, 4, 6), batch_size=2, elementwise=True)
    siblings = count_flops(_Comparisons(True), (1, 4, 6), batch_size=2, elementwise=True)
    assert report.total == 6 * 48 + 24 == siblings.total
    assert report.by_operator == {"lt": 48, "masked_fill_": 48, "tanh_": 48, "glu": 24, "prelu": 48, "le": 48,
                                  "ne": 48}
    assert report.uncounted == {}
    default = count_flops(_Comparisons(False), (1, 4, 6), batch_size=2)
    assert default.total == 0 and default.unknown_ops == {}
    assert set(default.uncounted) == {f"aten::{op}" for op in ("lt", "masked_fill_", "tanh_", "glu", "prelu", "le",
                                                               "ne")}


class _Einsum(nn.Module):
    def __init__(self, equation: str, second: str = "x"):
        super().__init__()
        self.equation, self.second = equation, second

    def forward(self, x):  # x: [1, 3, 16, 16]
        if self.second == "none":
            return torch.einsum(self.equation, x)
        if self.second == "rows":  # bc,bd->bcd on [1, 8] and [1, 8]
            return torch.einsum(self.equation, x[:, 0, 0, :8], x[:, 1, 0, :8])
        return torch.einsum(self.equation, x, x)


class _Sum(nn.Module):
    def forward(self, x):
        return x.sum((2, 3))


@pytest.mark.parametrize("equation, second, elementwise_count, listed", [
    ("bchw,bchw->bchw", "x", 3 * 16 * 16, True),  # a product, one per output element
    ("bc,bd->bcd", "rows", 8 * 8, True),  # an outer product, one per output element
    ("bchw->bc", "none", 3 * 16 * 16, True),  # a sum, one per input element like x.sum((2, 3))
    ("bchw->bhwc", "none", 0, False),  # a permutation: free, as permute is
])
def test_einsum_without_a_contraction_follows_the_elementwise_rule(equation, second, elementwise_count, listed):
    """Found by an audit: fvcore's einsum handle counted torch.einsum("bchw,bchw->bchw", x, x) on 3x16x16 as 384
    (half per element) by default, an outer product and a permutation alike. Hand counts."""
    default = count_flops(_Einsum(equation, second), (3, 16, 16))
    assert default.total == 0 and default.unknown_ops == {}
    assert default.uncounted == ({"aten::einsum": 1} if listed else {})
    full = count_flops(_Einsum(equation, second), (3, 16, 16), elementwise=True)
    assert full.total == elementwise_count and full.uncounted == {}
    if equation == "bchw->bc":
        assert full.total == count_flops(_Sum(), (3, 16, 16), elementwise=True).total


class _EinsumAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.randn(2, 3, 17, 13))

    def forward(self, q):  # q: [2, 3, 11, 13]
        return torch.einsum("bhqd,bhkd->bhqk", q, self.k)


def test_two_operand_einsum_contraction_is_counted_exactly():
    """fvcore reads the count back from numpy's printed path, rounded to 4 significant digits: 2*3*11*17*13 = 14,586
    multiply-adds came out as 14,585. Reference: torch.utils.flop_counter (einsum runs as bmm there) / 2."""
    model = _EinsumAttention()
    report = count_flops(model, (3, 11, 13), batch_size=2)
    assert report.by_operator == {"einsum": 2 * 3 * 11 * 17 * 13} == {"einsum": 14_586}
    assert report.total == _flop_counter_macs(model, torch.randn(2, 3, 11, 13))


class _EinsumChain(nn.Module):
    """``x @ A @ B`` as one einsum of three operands, the batch under an ellipsis."""

    def __init__(self, j, k, m):
        super().__init__()
        self.a = nn.Parameter(torch.randn(j, k))
        self.b = nn.Parameter(torch.randn(k, m))

    def forward(self, x):  # x: [batch, 1, i, j]
        return torch.einsum("...ij,jk,kl->...il", x, self.a, self.b)


def test_einsum_of_three_operands_is_counted_exactly_along_the_cheapest_order():
    """fvcore's count of an einsum of three operands is numpy's printed total, rounded to 4 significant digits:
    for 2x7x1001 @ 1001x3 @ 3x13, (2*7*1001*3 + 2*7*3*13) = 42,588 multiply-adds came out as 42,590. Reference:
    torch.utils.flop_counter / 2 (without opt_einsum torch contracts left to right, here also the cheapest order),
    and the hand count."""
    model = _EinsumChain(1001, 3, 13)
    report = count_flops(model, (1, 7, 1001), batch_size=2)
    assert report.total == 2 * 7 * 1001 * 3 + 2 * 7 * 3 * 13 == 42_588
    assert report.total == _flop_counter_macs(model, torch.randn(2, 1, 7, 1001))


def test_einsum_of_three_operands_is_counted_along_the_cheapest_order_not_left_to_right():
    """50x3 @ 3x100 @ 100x2: left to right costs 50*3*100 + 50*100*2 = 25,000 multiply-adds, the product of the
    last two first 3*100*2 + 50*3*2 = 900 (the papers' and fvcore's convention: the cheapest order)."""
    report = count_flops(_EinsumChain(3, 100, 2), (1, 50, 3), batch_size=1)
    assert report.by_operator == {"einsum": 3 * 100 * 2 + 50 * 3 * 2}


class _EinsumOfManyIndices(nn.Module):
    def forward(self, x):
        x = x.reshape([1] * 60)
        return torch.einsum(string.ascii_letters[:30] + "...," + string.ascii_letters[:30] + "...->a", x, x)


def test_einsum_of_more_indices_than_letters_is_refused_by_name():
    """torch runs it (60 indices), numpy's path finder and fvcore take 52 letters: an error naming the einsum."""
    with pytest.raises(ValueError, match=r"einsum abcd.*\.\.\.: with its 30 ellipsis dims it has more than 52 "):
        count_flops(_EinsumOfManyIndices(), (1, 1, 1), batch_size=1)


class _Fold(nn.Module):
    def __init__(self, **fold):
        super().__init__()
        self.fold = fold

    def forward(self, x):  # x: [2, 1, C * kh * kw, L], patches as F.unfold makes them
        return F.fold(x[:, 0], **self.fold)


def _fold_input_shape(channels: int, output_size, kernel_size, dilation=1, padding=0, stride=1):
    pair = nn.modules.utils._pair
    (oh, ow), (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(pair, (output_size, kernel_size, dilation, padding, stride))
    blocks = ((oh + 2 * ph - dh * (kh - 1) - 1) // sh + 1) * ((ow + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
    return channels * kh * kw, blocks


@pytest.mark.parametrize("fold", [
    dict(output_size=(7, 9), kernel_size=3, padding=1, stride=1),  # VOLO's outlooker: every element 9 times or less
    dict(output_size=(8, 8), kernel_size=3, padding=1, stride=2),  # VOLO's downsampling outlooker
    dict(output_size=(9, 10), kernel_size=(2, 3), dilation=2, stride=(3, 2)),  # gaps, dilation, no padding
    dict(output_size=(6, 6), kernel_size=2, stride=2),  # no overlap: no addition
])
def test_fold_counts_the_additions_of_overlapping_patches(fold):
    """Found by an audit: aten::col2im (F.fold) was a free op, its additions neither counted nor listed. Reference:
    torch's own fold of ones counts how many patch elements land on each output element; each costs n - 1."""
    shape = _fold_input_shape(4, **fold)
    landed = F.fold(torch.ones(2, *shape), **fold)
    additions = int((landed - 1).clamp(min=0).sum())
    report = count_flops(_Fold(**fold), (1, *shape), batch_size=2, elementwise=True)
    assert report.by_operator.get("col2im", 0) == report.total == additions
    default = count_flops(_Fold(**fold), (1, *shape), batch_size=2)
    assert default.total == 0 and default.uncounted == {"aten::col2im": 1} and default.unknown_ops == {}
    if fold["output_size"] == (7, 9):
        # by hand: 2 x 4 maps; each output element covered (stride 1), 3 times per dimension but twice at the edges
        # (19 row and 25 column coverings); 9 x 63 patch elements of which 19 * 25 land inside, 63 outputs
        assert additions == 2 * 4 * (19 * 25 - 7 * 9) == 3296
    if fold["stride"] == 2 and fold["kernel_size"] == 2:
        assert additions == 0


def test_img_size_is_another_name_for_input_size(monkeypatch):
    """Found by an audit: vitzoo.count_flops("resnet18", img_size=160) raised TypeError (compare() and timm say
    img_size). Hand count of the stem: a stride-2 7x7 conv 3 -> 64 on 160x160, 80x80 outputs."""
    import vitzoo

    report = vitzoo.count_flops("resnet18", img_size=160)
    assert report.input_size == (3, 160, 160)
    assert report.by_module["conv1"] == 80 * 80 * 64 * 7 * 7 * 3
    assert count_flops(nn.Conv2d(2, 4, 1), img_size=(2, 5, 6)).total == 5 * 6 * 4 * 2
    built = []
    monkeypatch.setattr("vitzoo.models.create", lambda *a, **k: built.append(a) or nn.Conv2d(3, 4, 1))
    with pytest.raises(TypeError, match=r"count_flops\(\) got both input_size=160 and img_size=224; img_size is "
                                        r"another name for input_size: pass one of them"):
        count_flops("resnet18", 160, img_size=224)
    assert built == []
    with pytest.raises(ValueError, match=r"img_size must be an int, \(H, W\) or \(C, H, W\) of positive ints, got 0"):
        count_flops(nn.Conv2d(3, 4, 1), img_size=0)


class _ScaledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(3))  # 3 params of the block's own
        self.fc = nn.Linear(4, 3)  # 15 params; on (1, 2, 4): 2 rows x 4 x 3 = 24 MACs

    def forward(self, x):
        return self.fc(x) * self.gamma


class _OwnParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(4))  # 4 params of the model's own
        self.block = _ScaledBlock()
        self.head = nn.Linear(3, 2)  # 8 params; 2 rows x 3 x 2 = 12 MACs

    def forward(self, x):
        return self.head(self.block(x + self.offset))


def test_table_rows_add_up_with_the_parameters_and_flops_modules_own():
    """Found by an audit: the rows left out the parameters owned by the model itself (deit_tiny's pos_embed and
    cls_token), so the top-level rows did not add up to the model row (5,679,400 against 5,717,416)."""
    report = count_flops(_OwnParams(), (1, 2, 4), fused=False, elementwise=True)
    assert report.params == 4 + 3 + 15 + 8
    # elementwise: the model's add (8 elements), the block's product (6 elements)
    assert report.table(max_depth=2).splitlines() == [
        "module         #params  FLOPs (MACs)",
        "------------------------------------",
        "model               30            50",
        "(model's own)        4             8",
        "block               18            30",
        "  block (own)        3             6",
        "  block.fc          15            24",
        "head                 8            12",
    ]
    assert "(own)" not in report.table(max_depth=0)
    deit = count_flops("deit_tiny_patch16_224").table(max_depth=1).splitlines()
    assert deit[3].split() == ["(model's", "own)", "38.016K", "0"]  # cls_token 192 + pos_embed 197 x 192 = 38,016


def _conv_norm(norm):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm).eval()
    _randomise_batchnorms(model)
    return model


@pytest.mark.parametrize("kind", ["sync", "sync_act", "split"])
def test_sync_and_split_batchnorms_fold_like_batchnorm2d(kind):
    """Found by a sweep: a model converted for distributed training (nn.SyncBatchNorm, timm's SyncBatchNormAct) or
    timm's SplitBatchNorm2d kept its norms in the fused count, and report.unfolded_norms did not name them. Hand
    count: one 3x3 conv 3 -> 4 at 8x8; folded, the norm costs nothing; and the folded model gives the same output."""
    from timm.layers import BatchNormAct2d, SplitBatchNorm2d, convert_sync_batchnorm

    if kind == "sync_act":  # timm converts a BatchNormAct2d so (SyncBatchNormAct takes its act and drop)
        model = _randomise_batchnorms(convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                                                           BatchNormAct2d(4)))).eval()
        assert type(model[1]).__name__ == "SyncBatchNormAct" and isinstance(model[1].act, nn.ReLU)
    else:
        model = _conv_norm(nn.SyncBatchNorm(4) if kind == "sync" else SplitBatchNorm2d(4))
    report = count_flops(model, (3, 8, 8))
    assert report.by_operator == {"conv": 64 * 4 * 27} and report.unfolded_norms == {}
    from vitzoo.batchnorm_folding import fold_batchnorms

    folded, count = fold_batchnorms(model, torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
    assert count == 1


def test_other_batchnorm_kinds_are_named_with_their_type():
    """A BatchNorm subclass (its forward may differ) is not folded, and the report says so instead of counting it
    silently. Hand count: the conv, and the norm at 2 per element."""
    class MyNorm(nn.BatchNorm2d):
        pass

    report = count_flops(_conv_norm(MyNorm(4)), (3, 8, 8))
    assert report.by_operator == {"conv": 64 * 4 * 27, "batch_norm": 2 * 4 * 64}
    assert report.unfolded_norms == {"1": "a MyNorm: only BatchNorm1d / BatchNorm2d / SyncBatchNorm (and timm's "
                                          "BatchNormAct2d) fold here, not other kinds or subclasses (whose forward "
                                          "may differ)"}


def test_a_norm_after_another_module_names_it():
    """Found by a sweep: a BatchNorm after a ConvTranspose2d, a ReLU or timm's MixedConv2d (a cat of convs) was
    said to follow "an activation's, an addition's..." output; the module is named now. Hand count: only the
    Conv2d -> BatchNorm pair folds."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.ConvTranspose2d(4, 4, 2, stride=2), nn.BatchNorm2d(4)).eval()
    report = count_flops(_randomise_batchnorms(model), (3, 8, 8))
    assert report.unfolded_norms == {"3": "its input is the output of 2 (ReLU), not of a Conv2d / Linear",
                                     "5": "its input is the output of 4 (ConvTranspose2d), not of a Conv2d / Linear"}
    assert report.by_operator["batch_norm"] == 2 * 4 * 64 + 2 * 4 * 256  # norm 3 at 8x8, norm 5 at 16x16


def test_table_depth_and_flags_are_checked():
    """Found by a review: table(max_depth=None) raised a bare comparison TypeError, max_depth=-1 gave a header only,
    and count_flops(fused="no") counted the fused model ("no" is truthy)."""
    import torch.nn as tnn

    model = tnn.Sequential(tnn.Sequential(tnn.Conv2d(3, 4, 3), tnn.Sequential(tnn.Conv2d(4, 4, 1))), tnn.Flatten())
    report = count_flops(model, 8)
    every = report.table(max_depth=None)
    assert "0.1.0" in every and every == report.table(max_depth=3)  # the deepest module: 0.1.0
    assert [line.split()[0] for line in report.table(max_depth=0).splitlines()[2:]] == ["model"]
    with pytest.raises(ValueError, match=r"max_depth must be >= 0 .* got -1"):
        report.table(max_depth=-1)
    with pytest.raises(TypeError, match=r"max_depth must be an int >= 0 or None .* got '2'"):
        report.table(max_depth="2")
    for flag in ("fused", "elementwise"):
        with pytest.raises(TypeError, match=rf"{flag} must be True or False, got 'no' \(str\)"):
            count_flops(model, 8, **{flag: "no"})
