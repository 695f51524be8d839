"""vitzoo.stem_chunking: the stem on batch slices gives the unsliced result; slice sizes from hand-computed bytes."""
import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

from vitzoo.inference import available_backends, deploy
from vitzoo.stem_chunking import BatchChunked, chunk_stem, find_stem, stem_chunk_size

from norms import randomize_norms  # tests/norms.py


@pytest.fixture(scope="module")
def shvit_s1_fused():
    torch.manual_seed(0)
    return reparameterize_model(randomize_norms(timm.create_model("shvit_s1")).eval())


def test_batch_chunked_equals_whole_batch_for_uneven_slices():
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        whole = stem(x)
        sliced = BatchChunked(stem, 2)(x)  # slices of 2, 2, 1
        single = BatchChunked(stem, 8)(x)  # one slice
    assert sliced.shape == whole.shape == (5, 16, 8, 8)
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(single, whole, atol=0, rtol=0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        BatchChunked(stem, 0)


def test_slice_size_of_shvit_s1_from_hand_computed_activations(shvit_s1_fused):
    name, stem = find_stem(shvit_s1_fused)
    assert name == "patch_embed"
    # largest activation: the first conv's output, 16 channels x 112 x 112 x 4 bytes = 802816 B per image;
    # output 128 x 14 x 14 x 4 = 100352 B (8x smaller). 2 MiB // 802816 = 2 images per slice.
    assert stem_chunk_size(stem, torch.zeros(1, 3, 224, 224)) == 2
    assert stem_chunk_size(stem, torch.zeros(1, 3, 224, 224), budget=4 * 802816) == 4
    assert stem_chunk_size(stem, torch.zeros(1, 3, 224, 224), budget=1000) == 1  # at least one image


def test_stems_that_do_not_qualify():
    vit = timm.create_model("deit_tiny_patch16_224")
    assert find_stem(vit) is None  # one convolution: nothing stays in cache between layers
    assert chunk_stem(vit, torch.zeros(16, 3, 224, 224)) is None

    class Flat(nn.Module):  # two 1x1 convs, no downsampling: largest activation 2x the output, below the 4x rule
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 8, 1))

        def forward(self, x):
            return self.stem(x)

    assert stem_chunk_size(Flat().stem, torch.zeros(1, 3, 32, 32)) is None
    assert chunk_stem(Flat(), torch.zeros(16, 3, 32, 32)) is None
    # exactly at the rule (mutation testing: "at least 4x" vs "more than 4x" went unnoticed): 16 -> 4 channels,
    # largest activation 16 x 32 x 32 x 4 B = 64 KiB, output 16 KiB: sliced, 2 MiB // 64 KiB = 32 per slice
    at_rule = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1))
    assert stem_chunk_size(at_rule, torch.zeros(1, 3, 32, 32)) == 32

    class TwoOutputs(nn.Module):  # a stem returning a tuple cannot be concatenated slice by slice
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return y, self.b(y)

    assert stem_chunk_size(TwoOutputs(), torch.zeros(1, 3, 224, 224)) is None


def test_chunk_stem_wraps_once_and_keeps_the_output(shvit_s1_fused):
    import copy

    model = copy.deepcopy(shvit_s1_fused)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        reference = shvit_s1_fused(x)
        assert chunk_stem(model, x) == 2
        assert isinstance(model.patch_embed, BatchChunked) and model.patch_embed.chunk_size == 2
        assert chunk_stem(model, x) is None  # already wrapped
        torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=0)
    assert chunk_stem(model, torch.zeros(1, 4, 224, 224)) is None  # the model's own call reports wrong channels


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
def test_torchscript_deploy_slices_the_stem():
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("shvit_s1")).eval()
    x = torch.randn(3, 3, 224, 224)
    deployed = deploy(model, x, backend="torchscript")
    assert "stem run on slices of 2 images (keeps its activations in cache)" in deployed.optimizations
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=0)


class _BatchStatisticsStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.BatchNorm2d(32, track_running_stats=False), nn.ReLU(),
                                  nn.Conv2d(32, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 8, 3, 2, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.stem(x))


def test_a_stem_with_batch_statistics_is_not_sliced():
    """Found by an audit: a BatchNorm without running statistics normalises over the batch even in eval mode, so
    the slices changed the result; deploy()'s check ran on a batch-1 example, where slicing changes nothing."""
    torch.manual_seed(0)
    model = _BatchStatisticsStem().eval()
    assert chunk_stem(model, torch.randn(1, 3, 128, 128)) is None
    assert not isinstance(model.stem, BatchChunked)
    # the same stem with running statistics is sliced (at 128x128 its first conv writes 2 MiB per image: 1 image)
    model.stem[1] = nn.BatchNorm2d(32).eval()
    assert chunk_stem(model, torch.randn(1, 3, 128, 128)) == 1
    if "torchscript" in available_backends():
        model = _BatchStatisticsStem().eval()
        deployed = deploy(model, torch.randn(1, 3, 128, 128), backend="torchscript")
        x = torch.randn(8, 3, 128, 128)
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), model(x), atol=1e-5, rtol=0)


def test_slice_probe_is_made_on_the_example_device():
    """Found by an audit: the probe was made on the CPU and scaled by the example's statistics, so a stem on a GPU
    got a device mismatch outside the guarded call. 'meta' stands in for the GPU."""
    from vitzoo.stem_chunking import _samples_independent

    seen = []

    class Recording(nn.Module):
        def forward(self, x):
            seen.append(x.device)
            raise RuntimeError("stop here")  # caught: the stem is then not sliced

    assert _samples_independent(Recording(), torch.empty(4, 3, 16, 16, device="meta"), 2) is False
    assert seen == [torch.device("meta")]


def test_the_stem_attributes_a_forward_reads_pass_through_the_wrapper():
    """Found by an audit: a hybrid ViT with dynamic_img_size reads `patch_embed.grid_size` in its forward, which the
    wrapper hid (AttributeError: 'BatchChunked' object has no attribute 'grid_size'), so its torchscript deploy
    failed."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_r26_s32_224", dynamic_img_size=True, depth=1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    deployed = deploy(model, x, backend="torchscript")
    assert any(o.startswith("stem run on slices") for o in deployed.optimizations), deployed.optimizations
    torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)
    wrapped = BatchChunked(model.patch_embed, 1)
    assert wrapped.grid_size == model.patch_embed.grid_size and wrapped.chunk_size == 1
    with pytest.raises(AttributeError, match="no_such_thing"):
        wrapped.no_such_thing


def test_the_wrapper_keeps_its_own_protocols_and_fusion():
    """Found by a review of the pass-through: deepcopy found a scripted stem's __deepcopy__ (the copy was the stem
    alone), and reparameterize found the stem's fuse() on the wrapper and replaced the wrapper (the chunking lost)."""
    import copy

    class Fusable(nn.Sequential):
        def fuse(self):
            return nn.Sequential(*self)

    scripted = BatchChunked(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))), 2)
    assert isinstance(copy.deepcopy(scripted), BatchChunked)
    model = nn.Sequential(BatchChunked(Fusable(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)), 2))
    model = reparameterize_model(model)
    assert isinstance(model[0], BatchChunked) and type(model[0].module) is nn.Sequential


def _conv_stem():
    return nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 8, 3, 2, 1))


class _IteratesItsStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = _conv_stem(), nn.Linear(8, 5)

    def forward(self, x):
        for layer in self.stem:
            x = layer(x)
        return self.head(x.mean((2, 3)))


class _IndexesItsStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = _conv_stem(), nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.stem[:2](x).mean((2, 3)))


class _ScaledStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 8, 3, 2, 1)

    def forward(self, x, scale):
        return self.c2(torch.relu(self.c1(x))) * scale


class _CallsItsStemWithAnArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = _ScaledStem(), nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.stem(x, 2.0).mean((2, 3)))


@pytest.mark.skipif("torchscript" not in available_backends(), reason="no TorchScript in this torch")
@pytest.mark.parametrize("cls", [_IteratesItsStem, _IndexesItsStem, _CallsItsStemWithAnArgument])
def test_a_model_that_uses_its_stem_otherwise_deploys_with_torchscript(cls):
    """Found by an audit: a model iterating over or indexing its stem, or calling it with another argument, failed
    deploy(backend='torchscript') ("'BatchChunked' object is not iterable", "BatchChunked.forward() takes 2
    positional arguments", or a bare TypeError from probing the stem), where 'eager' deploys it."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 256, 256)
    deployed = deploy(model, x, backend="torchscript")
    for batch in (1, 3):
        xi = torch.randn(batch, 3, 256, 256)
        with torch.no_grad():
            torch.testing.assert_close(deployed(xi), model(xi), atol=1e-5, rtol=0)
