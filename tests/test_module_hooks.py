"""Forward hooks through vitzoo.deploy (vitzoo.module_hooks): a hooked module is kept, so its hooks run.

Found by an audit (2026-11-26): deploy's eager backend replaced hooked layers (packed convolutions, AMX linear
layers, fused units), so a hook that changes an output gave wrong outputs (its check then failed with "report
this"), and one that records was never called. The reference is the hooked original model.
"""
import copy
import functools
import threading

import pytest
import timm
import torch
from timm.utils import reparameterize_model

import vitzoo
import vitzoo.inference
from norms import randomize_norms  # tests/norms.py
from vitzoo.module_hooks import hook_ids, lost_hooks, reparameterize

CASES = [  # (model, its arguments, input size, the hooked module: what deploy does to it without hooks)
    ("resnet18", {}, 64, "layer1.0.conv1"),  # Conv2d: BatchNorm folded in, packed for oneDNN / AMX
    ("resnet18", {}, 64, "layer1.0.bn1"),  # folded into conv1
    ("resnet18", {}, 64, "fc"),  # the head: an AMX linear layer (IEEE for 2-D inputs)
    ("resnet18", {}, 64, "layer1"),  # a block torch.fx traces through, without its hooks
    ("resnet18", {}, 64, "layer1.0.act1"),  # a ReLU merged into the conv before it (found by a review)
    ("resnet18", {}, 64, "layer1.0.aa"),  # an Identity the rewrite bypasses
    ("deit_tiny_patch16_224", {}, 224, "blocks.0.mlp.fc1"),  # an AMX linear layer (197 tokens)
    ("shvit_s1", {}, 64, "stages.1.blocks.0.ffn.m.pw1.c"),  # the conv of a ConvNorm, which fuse() replaces
    ("shvit_s1", {}, 64, "stages.1.blocks.0.ffn.m.pw1"),  # the ConvNorm itself
]


def _model(name, kwargs):
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, num_classes=10, **kwargs)).eval()


@pytest.mark.parametrize("name, kwargs, size, where", CASES, ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_a_hook_that_changes_an_output_runs_in_the_deployed_model(name, kwargs, size, where):
    model = _model(name, kwargs)
    model.get_submodule(where).register_forward_hook(lambda module, args, output: output * 0.5 + 0.1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        unhooked = copy.deepcopy(model)
        for module in unhooked.modules():
            module._forward_hooks.clear()
        assert (unhooked(x) - expected).abs().max() > 1e-3 * expected.abs().max()  # the hook matters (50x the bound)
    deployed = vitzoo.deploy(model, torch.randn(2, 3, size, size))
    with torch.no_grad():
        diff = (deployed(x) - expected).abs().max() / expected.abs().max()
    assert diff < 2e-5, diff


class _Recorder:
    def __init__(self):
        self.seen = []

    def hook(self, module, args, output):
        self.seen.append(output.clone())


RECORDED = [c for c in CASES if c[3] in ("layer1.0.conv1", "layer1", "blocks.0.mlp.fc1")]


@pytest.mark.parametrize("name, kwargs, size, where", RECORDED, ids=["conv", "block", "amx-linear"])
@pytest.mark.parametrize("kind", ["closure", "bound method", "partial"])
def test_a_hook_that_records_is_called_with_the_originals_values(name, kwargs, size, where, kind):
    """Also a bound method and a functools.partial: deepcopy copied their objects, so the deployed model recorded
    into a copy of the caller's recorder (found by a review)."""
    model = _model(name, kwargs)
    recorder = _Recorder()
    seen = recorder.seen
    hook = {"closure": lambda module, args, output: seen.append(output.clone()), "bound method": recorder.hook,
            "partial": functools.partial(_Recorder.hook, recorder)}[kind]
    model.get_submodule(where).register_forward_hook(hook)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model(x)
    expected = seen.pop()
    deployed = vitzoo.deploy(model, torch.randn(2, 3, size, size))
    seen.clear()
    deployed(x)
    assert len(seen) == 1  # once per call (before: never, for the block and the replaced layers)
    torch.testing.assert_close(seen[0].contiguous(), expected, rtol=0, atol=2e-5 * expected.abs().max().item())


def test_hooks_on_the_model_itself_skip_the_graph_rewrite():
    model = _model("resnet18", {})
    model.register_forward_hook(lambda module, args, output: output - 1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    deployed = vitzoo.deploy(model, x)
    assert any("the model itself has forward hooks" in note for note in deployed.optimizations)
    torch.testing.assert_close(deployed(x), expected, rtol=0, atol=1e-4)


def test_hooked_modules_are_left_out_of_bf16x3_and_the_rest_is_not():
    model = _model("deit_tiny_patch16_224", {})
    model.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, output: output)
    deployed = vitzoo.deploy(model, torch.randn(2, 3, 224, 224))
    linears = {name: type(m).__name__ for name, m in deployed.model.named_modules() if "mlp.fc1" in name}
    assert linears["blocks.0.mlp.fc1"] == "Linear"
    assert linears["blocks.1.mlp.fc1"] == ("AmxLinear" if deployed.fp32_precision == "bf16x3" else "Linear")


@pytest.mark.parametrize("name", ["shvit_s1", "mobileone_s0", "repvit_m0_9", "fastvit_t8"])
def test_reparameterize_without_hooks_is_timms(name):
    """Modules with fuse() (SHViT), reparameterize() (MobileOne, FastViT) and a fuse() that returns a container
    (RepViT): the same modules and tensors as timm.utils.reparameterize_model."""
    model = timm.create_model(name).eval()
    ours, theirs = reparameterize(copy.deepcopy(model)), reparameterize_model(model)
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    mine, timms = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == timms.keys() and all(torch.equal(mine[k], timms[k]) for k in mine)


def test_a_lost_hook_is_an_error_naming_its_module(monkeypatch):
    """The check behind the passes: with timm's reparameterize_model, which replaces the hooked ConvNorm, the hook
    would be gone; deploy says so instead of returning a model without it."""
    monkeypatch.setattr(vitzoo.inference, "reparameterize", lambda model: reparameterize_model(model, inplace=True))
    model = _model("shvit_s1", {})
    model.stages[1].blocks[0].ffn.m.pw1.register_forward_hook(lambda module, args, output: output)
    with pytest.raises(RuntimeError, match=r"^deploy\(\) lost the forward hooks on stages\.1\.blocks\.0\.ffn\.m\.pw1, "
                                           r"which it should have kept"):
        vitzoo.deploy(model, torch.randn(1, 3, 64, 64))


def test_hook_ids_survive_a_copy_and_name_their_modules():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    model[0].register_forward_pre_hook(lambda module, args: None)
    model.register_forward_hook(lambda module, args, output: None)
    ids = hook_ids(model)
    assert sorted(ids.values()) == ["0", "the model itself"]
    copied = copy.deepcopy(model)
    assert lost_hooks(ids, copied) == []
    copied[0] = torch.nn.Linear(2, 2)
    assert lost_hooks(ids, copied) == ["0"]


def test_a_model_whose_own_hooks_collect_its_output_deploys_and_counts():
    """Found by an audit: timm's FeatureHookNet (features_only=True, feature_cls='hook') collects its features with
    hooks bound to a collector it holds. The copy that deploy / count_flops fold shared those hooks with the
    caller's model, so its features went to the original's collector: deploy returned [] ("verified", the original
    then returning [] too) and count_flops counted 0. The reference: the same network as FeatureListNet, and the
    caller's model's own output before deploying."""
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet18", features_only=True, feature_cls="hook")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert len(expected) == 5
    deployed = vitzoo.deploy(model, x)
    out = deployed(x)
    assert len(out) == 5
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():
        for got, want in zip(model(x), expected):  # the caller's model still returns its own features
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    as_list = timm.create_model("resnet18", features_only=True)
    assert vitzoo.count_flops(model, 64).total == vitzoo.count_flops(as_list, 64).total > 0


def test_counting_leaves_the_callers_hooks_and_random_state_alone():
    """Found by an audit: count_flops advanced the global random generator (a seeded run changed when FLOPs were
    logged first) and called the caller's recording hook 4 times on random input."""
    model = timm.create_model("resnet18").eval()
    torch.manual_seed(0)
    expected = torch.rand(3)
    seen = []
    model.layer4.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    torch.manual_seed(0)
    vitzoo.count_flops(model, 64)
    vitzoo.count_flops("resnet18", 64)  # a model built from its name draws its initialisation too
    assert torch.equal(torch.rand(3), expected) and seen == []
    model(torch.randn(1, 3, 64, 64))
    assert seen == [(1, 512, 2, 2)]  # the hook is still the caller's


class _LockedRecorder:
    """A caller's recorder, as a logger or a SummaryWriter is: it holds a lock, which cannot be copied."""

    def __init__(self):
        self.lock, self.seen = threading.Lock(), []

    def record(self, module, args, output):
        with self.lock:
            self.seen.append(output.shape)

    __call__ = record


@pytest.mark.parametrize("kind", ["bound method", "callable object", "partial", "object and its method"])
def test_counting_calls_none_of_the_callers_hooks_whatever_they_are(kind):
    """Found by an audit: the copy count_flops runs on shared only plain functions with the caller's model; a bound
    method's object, a callable object and a partial's arguments were copied, so the caller's hook ran on random
    input (into a copy of the recorder) and, holding a lock, made counting fail ("cannot pickle '_thread.lock'")."""
    model = timm.create_model("resnet18").eval()
    recorder = _LockedRecorder()
    hooks = {"bound method": [recorder.record], "callable object": [recorder],
             "partial": [functools.partial(_LockedRecorder.record, recorder)],
             "object and its method": [recorder, recorder.record]}[kind]
    for hook in hooks:
        model.layer4.register_forward_hook(hook)
    expected = vitzoo.count_flops(timm.create_model("resnet18"), 64).total
    assert vitzoo.count_flops(model, 64).total == expected and recorder.seen == []
    model(torch.randn(1, 3, 64, 64))
    assert recorder.seen == [(1, 512, 2, 2)] * len(hooks)  # still the caller's hooks, on the caller's model


class _CollectsWithItsOwnHook(torch.nn.Module):
    """Returns an intermediate map that a hook it registers on itself collects: a bound method (``closure=False``,
    copied with a copy of the model) or a closure over ``self`` (which a copy cannot rebind)."""

    def __init__(self, closure: bool):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.feats = []
        if closure:
            self.a.register_forward_hook(lambda module, args, output: self.feats.append(output))
        else:
            self.a.register_forward_hook(self._collect)

    def _collect(self, module, args, output):
        self.feats.append(output)

    def forward(self, x):
        self.feats.clear()
        y = self.b(self.a(x))
        return [*self.feats, y]


def test_a_copy_whose_hook_acts_on_the_original_is_not_verified_against_itself():
    """Found by a review: deploy's reference output came from its own copy of the model, so a hook that still
    acts on the caller's model (a closure over ``self``) made the copy return 1 map where the model returns 2, and
    deploy said "verified". The reference is now the caller's model; a bound method is copied and deploys."""
    x = torch.randn(2, 3, 16, 16)
    bound = randomize_norms(_CollectsWithItsOwnHook(closure=False)).eval()
    with torch.no_grad():
        expected = bound(x)
    out = vitzoo.deploy(bound, x)(x)
    assert len(out) == len(expected) == 2
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    closure = _CollectsWithItsOwnHook(closure=True).eval()
    with pytest.raises(RuntimeError, match=r"structure differs from the original's: a list of 1 instead of a list "
                                           r"of 2"):
        vitzoo.deploy(closure, x)


def test_a_partial_naming_a_layer_records_into_the_callers_store():
    """Found by a review: partial(record, model.layer2, acts) was copied whole (a layer of the model among its
    arguments), so the deployed model recorded into a copy of the caller's dict."""
    model = randomize_norms(timm.create_model("resnet18")).eval()
    acts = {}

    def record(layer, store, module, args, output):
        store[layer] = output.shape

    model.layer2.register_forward_hook(functools.partial(record, model.layer2, acts))
    x = torch.randn(1, 3, 64, 64)
    deployed = vitzoo.deploy(model, x)
    acts.clear()
    deployed(x)
    assert acts == {model.layer2: (1, 128, 8, 8)}


def test_a_model_the_user_already_fused_is_counted_deployed_and_exported(tmp_path):
    """Found by an audit: timm's FastViT RepMixer fails when re-parameterised twice ('RepMixer' object has no
    attribute 'mixer'), and count_flops / deploy / export fused every model again, so a FastViT the user had fused
    was a traceback in all three. Blocks holding their fused reparam_conv are now left as they are. References: the
    count of the unfused model, and the unfused model's output."""
    pytest.importorskip("onnxruntime")
    from vitzoo.export import export_verified_onnx

    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("fastvit_t8")).eval()
    prefused = reparameterize_model(model)
    x = torch.randn(2, 3, 64, 64)
    assert vitzoo.count_flops(prefused, 64).total == vitzoo.count_flops(model, 64).total
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(vitzoo.deploy(prefused, x)(x), expected, atol=1e-4, rtol=0)
    export_verified_onnx(prefused, tmp_path / "fastvit.onnx", img_size=64)
    assert (tmp_path / "fastvit.onnx").stat().st_size > 0
