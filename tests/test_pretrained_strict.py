"""``pretrained_strict=False``, timm's opt-out of a strict load, in both model packages.

Reference: the tensors of the partial state dict (loaded ones must equal them) and a model built with the same seed
and no weights (the others must equal its fresh initialisation); the names the warning must list come from torch's
own ``load_state_dict(strict=False)`` report on a plain model. timm's own models raise on shape mismatches with
``strict=False`` too, which the last test checks.
"""
import re
import warnings

import pytest
import timm
import torch

import nvit
import shvit

DIMS = dict(embed_dim=32, heads=[2, 1, 3], qk_dim=[8, 16, 8], v_dim=[16, 8, 8], mlp_dim=[48, 32, 64])
NVIT = dict(dims=DIMS, img_size=64, token_mask=True, distilled=True)  # the cfg's 1000 classes: timm keeps the heads


def _randomised(state_dict):
    """Every float tensor random (positive for BN running variances), so that no fresh init equals it."""
    g = torch.Generator().manual_seed(7)
    return {k: (torch.rand(v.shape, generator=g) + 0.5 if k.endswith(('running_var', 'token_mask'))
                else torch.randn(v.shape, generator=g) * 0.1) if v.is_floating_point() else v
            for k, v in state_dict.items()}


def _torch_report(name, kwargs, state_dict):
    """torch's missing / unexpected keys for ``state_dict`` in a plain ``name`` model (BN step counters aside)."""
    result = timm.create_model(name, **kwargs).load_state_dict(state_dict, strict=False)
    keep = [k for k in result.missing_keys if not k.endswith('num_batches_tracked')]
    return keep, list(result.unexpected_keys)


def _load(name, kwargs, state_dict, seed=1, **extra):
    """Load ``state_dict`` non-strictly into ``name`` built with ``seed``; the one warning it gives."""
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model = timm.create_model(name, pretrained=True, pretrained_strict=False,
                                  pretrained_cfg_overlay=dict(state_dict=state_dict), **kwargs, **extra)
    partial = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and 'Partial' in str(w.message)]
    assert len(partial) == 1, [str(w.message) for w in caught]
    return model, partial[0]


def _check_tensors(model, fresh, state_dict, source):
    """Loaded tensors equal ``state_dict``'s; the others equal the fresh model's, and differ from the source's."""
    got, init = model.state_dict(), fresh.state_dict()
    kept = [k for k in got if k not in state_dict]
    assert kept
    for k, v in got.items():
        assert torch.equal(v, state_dict[k] if k in state_dict else init[k]), k
    assert any(not torch.equal(got[k], source[k]) for k in kept if got[k].is_floating_point())


def _warned_names(message, missing, unexpected):
    """The warning gives both counts and the first five names of each list (unexpected ones in any order)."""
    listed = re.search(r"(\d+) of the model's tensors are not in the checkpoint and keep their initialisation: "
                       r"(.*?)(?:; \d+ tensors? of the checkpoint|\.$)", message)
    assert (listed is not None) == bool(missing)
    if missing:
        assert int(listed.group(1)) == len(missing)
        assert [n for n in listed.group(2).split(', ') if not n.startswith('...')] == missing[:5]
    extra = re.search(r"(\d+) tensors? of the checkpoint (?:is|are) not in the model and not loaded: (.*)\.$", message)
    assert (extra is not None) == bool(unexpected)
    if unexpected:
        names = [n for n in extra.group(2).split(', ') if not n.startswith('...')]
        assert int(extra.group(1)) == len(unexpected)
        assert len(names) == min(5, len(unexpected)) and set(names) <= set(unexpected)


# ---------------------------------------------------------------- SHViT
@pytest.fixture(scope='module')
def s1_source():
    return _randomised(timm.create_model('shvit_s1').state_dict())


def test_shvit_partial_state_dict_loads_with_a_warning(s1_source):
    """Found by an audit: the repro of the report (stages.2 left out) was 'Checkpoint is incomplete' although timm's
    own SHViT loads it with pretrained_strict=False."""
    part = {k: v for k, v in s1_source.items() if not k.startswith('stages.2')}
    part['extra.scale'] = torch.ones(4)
    missing, unexpected = _torch_report('shvit_s1', {}, part)
    assert len(missing) == 184 and unexpected == ['extra.scale']
    model, message = _load('shvit_s1', {}, part)
    torch.manual_seed(1)
    fresh = timm.create_model('shvit_s1')
    _check_tensors(model, fresh, part, s1_source)
    _warned_names(message, missing, unexpected)
    assert message.startswith('Partial load of shvit_s1 (pretrained_strict=False): 184 ')


@pytest.mark.parametrize('extra', [dict(), dict(num_classes=10), dict(features_only=True)])
def test_shvit_missing_classifier_and_first_conv(s1_source, extra):
    """With the cfg's num_classes a checkpoint without classifier is a missing head.l (was: refused); with another
    num_classes or features_only the classifier timm drops is not counted as missing."""
    part = {k: v for k, v in s1_source.items() if not k.startswith('head.l.') and k != 'patch_embed.0.c.weight'}
    model, message = _load('shvit_s1', {}, part, **extra)
    named = ['patch_embed.0.c.weight'] + (['head.l.weight', 'head.l.bias'] if not extra else [])
    assert f"{len(named)} of the model's tensors are not in the checkpoint and keep their initialisation: " \
           f"{', '.join(named)}." in message
    if extra.get('features_only'):
        return
    torch.manual_seed(1)
    fresh = timm.create_model('shvit_s1', **extra)
    _check_tensors(model, fresh, {k: v for k, v in part.items() if k in fresh.state_dict()}, s1_source)


def test_shvit_non_strict_still_refuses_what_does_not_fit(s1_source, tmp_path):
    """Shapes (another variant), another model family, a classifier of another size and a corrupt file are errors
    with pretrained_strict=False too."""
    def create(**kwargs):
        return timm.create_model('shvit_s1', pretrained=True, pretrained_strict=False, **kwargs)

    torch.manual_seed(0)
    s2 = timm.create_model('shvit_s2').state_dict()
    with pytest.raises(RuntimeError, match='expected shvit_s1, found shvit_s2') as info:
        create(pretrained_cfg_overlay=dict(state_dict=s2))
    assert isinstance(info.value.__cause__, shvit.CheckpointMismatchError)
    vit = timm.create_model('nvit_b', **NVIT).state_dict()
    with pytest.raises(RuntimeError, match='found not an .*SHViT checkpoint'):
        create(pretrained_cfg_overlay=dict(state_dict=vit))
    one_block = dict(s1_source)
    one_block['stages.1.blocks.0.conv.m.c.weight'] = torch.zeros(3, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"1 with other shapes, e\.g\. \['stages\.1\.blocks\.0\.conv\.m\.c\.weight'"):
        create(pretrained_cfg_overlay=dict(state_dict=one_block))
    # a tensor that does not tell the variant: named as a modified shvit_s1, with both shapes (an audit found
    # "expected shvit_s1, found shvit_s1" here)
    key = 'stages.0.blocks.0.ffn.m.pw1.c.weight'
    ffn = dict(s1_source, **{key: torch.zeros(10, 10, 1, 1)})
    with pytest.raises(RuntimeError, match=rf"1 tensor\(s\) of other shapes than shvit_s1's \(e\.g\. {key}: "
                                           r"\[10, 10, 1, 1\] in the checkpoint, \[256, 128, 1, 1\] in the model\): "
                                           r"it was saved from a modified shvit_s1"):
        create(pretrained_cfg_overlay=dict(state_dict=ffn))
    ten = dict(s1_source, **{'head.l.weight': torch.zeros(10, 320), 'head.l.bias': torch.zeros(10)})
    with pytest.raises(RuntimeError, match=r'classifier \(head\.l\) has 10 outputs'):
        create(pretrained_cfg_overlay=dict(state_dict=ten))
    path = tmp_path / 'cut.pth'
    torch.save(s1_source, path)
    path.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(shvit.CorruptCheckpointError):
        create(pretrained_cfg_overlay=dict(file=str(path)))


def test_shvit_strict_errors_name_the_opt_out(s1_source):
    part = {k: v for k, v in s1_source.items() if not k.startswith('stages.2')}
    with pytest.raises(RuntimeError, match=r"Checkpoint is incomplete: 184 of the model's tensors are missing "
                                           r"\(e\.g\. \[.*pass pretrained_strict=False"):
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict=part))
    with pytest.raises(RuntimeError, match=r"extra\.scale.*pass pretrained_strict=False"):
        timm.create_model('shvit_s1', pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict=dict(s1_source, **{'extra.scale': torch.ones(2)})))


# ---------------------------------------------------------------- NViT / ReViT
@pytest.fixture(scope='module')
def nvit_source():
    return _randomised(timm.create_model('nvit_b', **NVIT).state_dict())


@pytest.mark.parametrize('case', ['token_scale', 'block_and_extra', 'classifier'])
def test_nvit_partial_state_dict_loads_with_a_warning(nvit_source, case):
    """Found by an audit: a missing token scale was an IncompatibleCheckpointError and extra tensors too, whatever
    pretrained_strict said; a missing q/k/v weight did not even get past the dims check."""
    if case == 'token_scale':
        part = {k: v for k, v in nvit_source.items() if k != 'blocks.1.attn.token_mask'}
    elif case == 'block_and_extra':
        part = {k: v for k, v in nvit_source.items()
                if not k.startswith('blocks.2.') and k != 'blocks.0.attn.qkv.weight'}
        part['blocks.3.mlp.fc1.weight'] = torch.ones(8, 32)  # a block beyond the model's depth
        part['extra.gate'] = torch.ones(1)
    else:
        part = {k: v for k, v in nvit_source.items() if not k.startswith(('head.', 'head_dist.', 'norm.'))}
    missing, unexpected = _torch_report('nvit_b', NVIT, part)
    model, message = _load('nvit_b', NVIT, part)
    torch.manual_seed(1)
    fresh = timm.create_model('nvit_b', **NVIT)
    _check_tensors(model, fresh, part, nvit_source)
    _warned_names(message, missing, unexpected)
    x = torch.randn(1, 3, 64, 64)
    reference = timm.create_model('nvit_b', **NVIT).eval()
    reference.load_state_dict({**fresh.state_dict(), **{k: v for k, v in part.items() if k not in unexpected}})
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference(x))


def test_revit_missing_token_scale_as_in_the_report():
    source = _randomised(timm.create_model('revit_t').state_dict())
    part = {k: v for k, v in source.items() if k != 'blocks.5.attn.token_mask'}
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r'blocks\.5\.attn\.token_mask.*pretrained_strict=False'):
        timm.create_model('revit_t', pretrained=True, pretrained_cfg_overlay=dict(state_dict=part))
    model, message = _load('revit_t', {}, part)
    assert "1 of the model's tensors are not in the checkpoint and keep their initialisation: " \
           "blocks.5.attn.token_mask." in message
    torch.manual_seed(1)
    fresh = timm.create_model('revit_t')
    _check_tensors(model, fresh, part, source)


def test_nvit_non_strict_still_refuses_what_does_not_fit(nvit_source, tmp_path):
    """Another family, other widths, a distilled / plain mismatch, a classifier of another size, another tensor shape
    and a corrupt file are errors with pretrained_strict=False too."""
    def create(state_dict=None, **kwargs):
        overlay = dict(state_dict=state_dict) if state_dict is not None else {}
        overlay.update(kwargs.pop('overlay', {}))
        return timm.create_model('nvit_b', pretrained=True, pretrained_strict=False,
                                 pretrained_cfg_overlay=overlay, **dict(NVIT, **kwargs))

    with pytest.raises(nvit.IncompatibleCheckpointError, match='a SHViT checkpoint'):
        create(timm.create_model('shvit_s1', device='meta').state_dict())
    wide = dict(nvit_source, **{'blocks.1.mlp.fc1.weight': torch.zeros(40, 32)})
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r'block 1: heads\*qk, heads\*v, mlp = \(16, 8, 32\) '
                                                               r'vs weights \(16, 8, 40\)'):
        create(wide)
    with pytest.raises(nvit.IncompatibleCheckpointError, match='checkpoint is distilled'):
        create(nvit_source, distilled=False)
    with pytest.raises(nvit.checkpoint.ClassifierSizeError, match=r'classifier \(head\) has 1000 outputs'):
        create(nvit_source, num_classes=7, overlay=dict(num_classes=7))
    bad_norm = dict(nvit_source, **{'norm.weight': torch.ones(31)})
    with pytest.raises(RuntimeError, match=r'size mismatch for norm\.weight'):
        create(bad_norm)
    path = tmp_path / 'cut.safetensors'
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in nvit_source.items()}, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(nvit.CorruptCheckpointError):
        create(overlay=dict(file=str(path)))


def test_load_pretrained_model_passes_the_opt_out(s1_source, nvit_source):
    """vitzoo.hub.load_pretrained_model hands pretrained_strict to create_model: partial loads work there too, and
    without it the WeightsError keeps the model's advice."""
    from vitzoo.hub import WeightsError, load_pretrained_model
    part = {k: v for k, v in s1_source.items() if not k.startswith('stages.2')}
    with pytest.raises(WeightsError, match='pretrained_strict=False'):
        load_pretrained_model('shvit_s1', pretrained_cfg_overlay=dict(state_dict=part))
    with pytest.warns(UserWarning, match=r'Partial load of shvit_s1 .*184 of'):
        model = load_pretrained_model('shvit_s1', pretrained_strict=False, pretrained_cfg_overlay=dict(state_dict=part))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in part.items())
    nv = {k: v for k, v in nvit_source.items() if k != 'blocks.0.attn.token_mask'}
    with pytest.warns(UserWarning, match=r'Partial NViT load .*blocks\.0\.attn\.token_mask'):
        load_pretrained_model('nvit_b', pretrained_strict=False, pretrained_cfg_overlay=dict(state_dict=nv), **NVIT)


def test_timm_itself_raises_on_shapes_with_strict_false():
    """The rule followed above: timm's own loader with strict=False skips missing / extra keys but raises on a
    tensor of another shape."""
    sd = timm.create_model('resnet10t', device='meta').state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    sd['fc.weight'] = torch.zeros(1000, 7)
    with pytest.raises(RuntimeError, match=r'size mismatch for fc\.weight'):
        timm.create_model('resnet10t', pretrained=True, pretrained_strict=False,
                          pretrained_cfg_overlay=dict(state_dict=sd))
    del sd['fc.weight']
    sd['extra'] = torch.ones(1)
    timm.create_model('resnet10t', pretrained=True, pretrained_strict=False, pretrained_cfg_overlay=dict(state_dict=sd))
