"""Loading SHViT weights: timm layout, official layout, local files, wrong variants, missing / corrupt files."""
import logging
import re

import pytest
import torch
import timm
from safetensors.torch import save_file

import shvit
from files import damage_largest_member  # tests/files.py


def _random_state_dict(variant: str, **kwargs):
    """A timm-layout state dict with every tensor random (positive running variances)."""
    torch.manual_seed(0)
    sd = timm.create_model(variant, **kwargs).state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith('num_batches_tracked'):
            out[k] = v
        elif k.endswith('running_var'):
            out[k] = torch.rand_like(v) + 0.5
        else:
            out[k] = torch.randn_like(v) * 0.1
    return out


def _to_official(sd):
    """timm layout -> official layout, written independently of shvit.checkpoint (key by key, from the reference)."""
    downsample_slot = {0: ['0', '0'], 1: ['0', '1'], 2: ['1'], 3: ['2', '0'], 4: ['2', '1']}
    out = {}
    for k, v in sd.items():
        parts = k.split('.')
        if parts[0] == 'stages':
            stage, kind, idx, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == 'blocks':
                head = [f'blocks{stage + 1}', str(idx + (3 if stage > 0 else 0))]
            else:
                head = [f'blocks{stage + 1}'] + downsample_slot[idx]
            k = '.'.join(head + rest)
        out[k] = v
    return out


@pytest.fixture(scope='module')
def s1_weights():
    return _random_state_dict('shvit_s1')


@pytest.fixture(scope='module')
def s1_reference(s1_weights):
    m = timm.create_model('shvit_s1').eval()
    m.load_state_dict(s1_weights)
    return m


def test_official_layout_with_distill_head_loads(tmp_path, s1_weights, s1_reference, caplog):
    official = _to_official(s1_weights)
    assert len(official) == 471 and 'blocks3.7.ffn.m.pw2.bn.bias' in official and 'blocks2.1.se.fc1.weight' in official
    head_dist = {k.replace('head.', 'head_dist.', 1): torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in official.items() if k.startswith('head.')}
    head_dist['head_dist.bn.running_var'] = torch.rand(320) + 0.5
    path = tmp_path / 'shvit_s1.pth'
    torch.save({'model': {**official, **head_dist}, 'epoch': 299}, path)
    x = torch.randn(2, 3, 96, 96)
    with caplog.at_level(logging.WARNING, logger='shvit.checkpoint'):
        m = timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert 'head_dist' in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(m(x), s1_reference(x), rtol=0, atol=0)
        md = timm.create_model(
            'shvit_s1', pretrained=True, distilled=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        pooled = s1_reference.forward_head(s1_reference.forward_features(x), pre_logits=True)
        bn_w, bn_b = head_dist['head_dist.bn.weight'], head_dist['head_dist.bn.bias']
        mean, var = head_dist['head_dist.bn.running_mean'], head_dist['head_dist.bn.running_var']
        dist = ((pooled - mean) / (var + 1e-5).sqrt() * bn_w + bn_b) @ head_dist['head_dist.l.weight'].T \
            + head_dist['head_dist.l.bias']
        torch.testing.assert_close(md(x), (s1_reference(x) + dist) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('keys', [('model', 'model_ema'), ('state_dict', 'state_dict_ema')])
def test_training_checkpoint_loads_the_model_not_its_ema(tmp_path, s1_weights, s1_reference, keys):
    """The official training script saves 'model' and 'model_ema'; its evaluation (and the release's accuracy) is
    'model'. timm's own file loader would take the EMA copy."""
    ema = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in s1_weights.items()}
    path = tmp_path / 'checkpoint.pth'
    torch.save({keys[0]: _to_official(s1_weights), keys[1]: _to_official(ema), 'epoch': 299}, path)
    m = timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), s1_reference(x), rtol=0, atol=0)
    assert 'state_dict' not in m.pretrained_cfg and m.pretrained_cfg['file'] == str(path)
    features = timm.create_model('shvit_s1', pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    assert 'state_dict' not in features.pretrained_cfg


@pytest.mark.parametrize('name', ['pytorch_model.bin', 'checkpoint.pth'])
def test_local_dir_training_checkpoint_loads_the_model_not_its_ema(tmp_path, s1_weights, s1_reference, name):
    """Found by an audit: through local-dir: timm's folder loader took the EMA copy of a folder's training checkpoint,
    unlike file= (the previous test). Both take 'model' now; the folder's cfg source is kept."""
    import json

    ema = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in s1_weights.items()}
    folder = tmp_path / 'folder'
    folder.mkdir()
    config = {'architecture': 'shvit_s1', 'num_classes': 1000, 'pretrained_cfg': {}}
    (folder / 'config.json').write_text(json.dumps(config))
    torch.save({'model': s1_weights, 'model_ema': ema, 'epoch': 299}, folder / name)  # timm layout, as timm's
    m = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), s1_reference(x), rtol=0, atol=0)
    assert 'state_dict' not in m.pretrained_cfg and m.pretrained_cfg['source'] == 'local-dir'
    assert m.pretrained_cfg['file'] == str(folder)


def test_ddp_module_prefix_is_stripped(s1_weights):
    """A checkpoint saved from a DistributedDataParallel wrapper ('module.' before every key, official layout) gives
    exactly the unwrapped timm-layout state dict."""
    wrapped = {'model': {'module.' + k: v for k, v in _to_official(s1_weights).items()}}
    out = shvit.checkpoint_filter_fn(wrapped, timm.create_model('shvit_s1', device='meta'))
    assert set(out) == set(s1_weights)
    assert all(out[k] is s1_weights[k] for k in s1_weights)


@pytest.mark.parametrize('cast', [lambda v: v > 0, lambda v: (v * 100).to(torch.int8)], ids=['bool', 'int8'])
@pytest.mark.parametrize('fused', [False, True])
def test_integer_or_boolean_weights_are_refused_not_cast(tmp_path, s1_weights, s1_reference, cast, fused):
    """Found by an audit: load_state_dict cast a bool or int8 checkpoint into the float weights (all 0 / 1) and
    `vitzoo convert` wrote it; one such tensor among float ones too."""
    import copy
    from timm.utils import reparameterize_model

    weights = reparameterize_model(copy.deepcopy(s1_reference)).state_dict() if fused else dict(s1_weights)
    key = 'head.weight' if fused else 'head.l.weight'
    floats = dict(weights)
    weights[key] = cast(weights[key])
    model = reparameterize_model(timm.create_model('shvit_s1')) if fused else timm.create_model('shvit_s1')
    with pytest.raises(shvit.CheckpointLayoutError, match=rf"Checkpoint tensor {re.escape(key)} is torch\.(bool|int8) "
                                                          r"where the model's is torch\.float32 \(1 such tensor"):
        shvit.checkpoint_filter_fn(weights, model)
    if not fused:
        path = tmp_path / 'cast.safetensors'
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
        with pytest.raises(shvit.CheckpointLayoutError, match=r'from file .*cast\.safetensors: Checkpoint tensor'):
            timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    half = {k: v.half() if v.is_floating_point() else v for k, v in floats.items()}
    assert set(shvit.checkpoint_filter_fn(half, model)) == set(model.state_dict())  # float16 stays allowed


def test_timm_layout_safetensors_with_in_chans_and_num_classes(tmp_path, s1_weights):
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in s1_weights.items()}, str(path))
    m = timm.create_model(
        'shvit_s1', pretrained=True, in_chans=1, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    sd = m.state_dict()
    # timm's first-conv adaptation for 1 channel sums the RGB filters
    torch.testing.assert_close(sd['patch_embed.0.c.weight'], s1_weights['patch_embed.0.c.weight'].sum(1, keepdim=True))
    torch.testing.assert_close(sd['stages.2.blocks.4.mixer.m.qkv.c.weight'],
                               s1_weights['stages.2.blocks.4.mixer.m.qkv.c.weight'])
    torch.testing.assert_close(sd['head.bn.running_var'], s1_weights['head.bn.running_var'])
    assert sd['head.l.weight'].shape == (10, 320)
    assert m.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 10)
    md = timm.create_model('shvit_s1', pretrained=True, distilled=True, num_classes=10,
                           pretrained_cfg_overlay=dict(file=str(path)))
    assert md.head_dist.l.weight.shape == (10, 320)
    torch.testing.assert_close(md.head_dist.bn.running_var, s1_weights['head.bn.running_var'])


def test_wrong_variant_names_expected_and_found():
    sd = _random_state_dict('shvit_s2')
    with pytest.raises(RuntimeError, match=r'shvit_s1.*expected shvit_s1, found shvit_s2') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
    assert isinstance(info.value.__cause__, shvit.CheckpointMismatchError)
    with pytest.raises(RuntimeError, match='found shvit_s2'):
        shvit.checkpoint_filter_fn({'model': _to_official(sd)}, timm.create_model('shvit_s1', device='meta'))


def test_other_model_weights_rejected():
    sd = timm.create_model('resnet18', device='meta').state_dict()
    with pytest.raises(RuntimeError, match='expected shvit_s1, found not an .*SHViT checkpoint'):
        shvit.checkpoint_filter_fn(sd, timm.create_model('shvit_s1', device='meta'))


def test_truncated_checkpoint_reports_missing_keys(s1_weights):
    sd = {k: v for k, v in s1_weights.items() if not k.startswith('stages.2.blocks.4.')}
    with pytest.raises(RuntimeError, match=r"incomplete: \d+ of the model's tensors are missing "
                                           r"\(e.g. \[.stages\.2\.blocks\.4"):
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))


@pytest.mark.parametrize('dropped', [
    'patch_embed.0.c.weight', 'head.bn.weight', 'stages.1.blocks.0.ffn.m.pw1.c.weight'])
def test_incomplete_checkpoint_is_refused_also_with_another_num_classes(s1_weights, dropped):
    """With another num_classes timm loads non-strictly (it drops the classifier): a missing tensor must still be
    an error, not a random-init gap."""
    assert dropped in s1_weights
    sd = {k: v for k, v in s1_weights.items() if k != dropped}
    for num_classes in (1000, 10):
        message = r"Checkpoint is incomplete: 1 of the model's tensors are missing"
        with pytest.raises(RuntimeError, match=message) as info:
            timm.create_model('shvit_s1', pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(state_dict=sd))
        assert dropped in str(info.value) and 'entrypoint of the variant' not in str(info.value)
    m = timm.create_model('shvit_s1', pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(state_dict=s1_weights))
    torch.testing.assert_close(m.state_dict()['head.bn.weight'], s1_weights['head.bn.weight'], rtol=0, atol=0)


@pytest.mark.parametrize('extra', ['head.extra', 'stages.0.blocks.0.extra.weight', 'foo'])
def test_extra_tensors_are_refused_also_with_another_num_classes(s1_weights, extra):
    """Found by an audit: with another num_classes timm loads non-strictly and skipped a tensor the model does not
    have with only a logged warning; with the checkpoint's own num_classes torch's strict load refuses it."""
    sd = {**s1_weights, extra: torch.zeros(3)}
    for num_classes in (1000, 5):
        with pytest.raises(RuntimeError,
                           match=rf"Checkpoint has 1 tensor that shvit_s1 does not have .*'{extra}'.*modified model") \
                as info:
            timm.create_model('shvit_s1', pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(state_dict=sd))
        assert "entrypoint of the variant" not in str(info.value)  # not another variant: no advice saying it is
    from vitzoo.hub import WeightsError, load_pretrained_model
    with pytest.raises(WeightsError) as info:
        load_pretrained_model('shvit_s1', pretrained_cfg_overlay=dict(state_dict=sd))
    assert "modified model" in str(info.value) and "another model or variant" not in str(info.value)


def test_pretrained_without_a_head_num_classes_0(s1_weights, s1_reference, caplog):
    """Found by an audit: create_model(name, pretrained=True, num_classes=0), the usual feature extractor, was
    refused: the checkpoint's head BatchNorm counted as tensors 'of a modified model'. Also a checkpoint whose
    classifier was removed (head.bn kept) loads for features or a new classifier, and with the cfg's 1000 classes
    the error says what to pass instead of torch's missing-key list."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = s1_reference.forward_head(s1_reference.forward_features(x), pre_logits=True)
    headless = {k: v for k, v in s1_weights.items() if not k.startswith('head.l.')}
    for sd in (s1_weights, headless):
        with caplog.at_level(logging.WARNING):
            m = timm.create_model('shvit_s1', pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(state_dict=sd)).eval()
        assert not [r for r in caplog.records if 'Unexpected keys' in r.getMessage()]
        with torch.no_grad():
            torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    m = timm.create_model('shvit_s1', pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(state_dict=headless))
    torch.testing.assert_close(m.state_dict()['head.bn.weight'], s1_weights['head.bn.weight'], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r'no classifier \(head\.l\).*num_classes=0') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict=headless))
    assert isinstance(info.value.__cause__, shvit.checkpoint.IncompleteCheckpointError)


def test_features_only_takes_a_fine_tuned_or_headless_checkpoint(s1_weights, s1_reference):
    """Found by an audit: features_only=True (timm drops the head after loading) refused a 10-class or headless
    checkpoint as a classifier of the wrong size, where timm's own models load both."""
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y, expected = s1_reference.patch_embed(x), []
        for stage in s1_reference.stages:
            y = stage(y)
            expected.append(y)
    ten_classes = {**s1_weights, 'head.l.weight': torch.randn(10, 320), 'head.l.bias': torch.randn(10)}
    headless = {k: v for k, v in s1_weights.items() if not k.startswith('head.')}
    for sd in (ten_classes, headless):
        m = timm.create_model('shvit_s1', pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(state_dict=sd)).eval()
        with torch.no_grad():
            for got, want in zip(m(x), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    body_gap = {k: v for k, v in headless.items() if k != 'stages.1.blocks.0.ffn.m.pw1.c.weight'}
    with pytest.raises(RuntimeError, match=r"incomplete.*stages\.1\.blocks\.0\.ffn\.m\.pw1\.c\.weight"):
        timm.create_model('shvit_s1', pretrained=True, features_only=True,
                          pretrained_cfg_overlay=dict(state_dict=body_gap))


def test_classifier_of_another_size_says_how_to_load_it(s1_weights, tmp_path):
    """A fine-tuned 10-class checkpoint loaded with the cfg's 1000 classes: the error's advice, followed as written,
    loads its classifier (found by an audit: it said "create the model with num_classes=10", with which timm drops the
    checkpoint's classifier and starts a new one, silently)."""
    ten = {**s1_weights, 'head.l.weight': torch.randn(10, 320), 'head.l.bias': torch.randn(10)}
    path = tmp_path / 'ft10.safetensors'
    save_file(ten, str(path))
    with pytest.raises(RuntimeError, match=r"classifier \(head\.l\) has 10 outputs, the model's 1000\. To load "
                                           r"it") as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert isinstance(info.value.__cause__, shvit.checkpoint.ClassifierSizeError)
    message = str(info.value)
    assert "num_classes=10, pretrained_cfg_overlay=dict(file=..., num_classes=10)" in message
    assert "--num-classes 10" in message
    m = timm.create_model('shvit_s1', pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in ten.items())
    alone = timm.create_model('shvit_s1', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    assert not torch.equal(alone.head.l.weight, ten['head.l.weight'])  # what the advice warns about


def test_checkpoints_of_compiled_and_ddp_models_load(s1_weights):
    """A torch.compile'd model saves `_orig_mod.` keys, DDP `module.` (found by a review: `_orig_mod.` was refused as
    "not an SHViT checkpoint"; NViT took both)."""
    for prefix in ('_orig_mod.', 'module.', 'module._orig_mod.', '_orig_mod.module.'):
        sd = {prefix + k: v for k, v in s1_weights.items()}
        m = timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict={'model': sd}))
        loaded = m.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in s1_weights.items()), prefix


def test_missing_hub_file_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(RuntimeError, match=r'shvit_s4 from Hugging Face Hub repo timm/shvit_s4\.in1k') as info:
        timm.create_model('shvit_s4.in1k', pretrained=True)
    assert 'hf download timm/shvit_s4.in1k' in str(info.value)
    # an OSError too, as timm's own offline error (LocalEntryNotFoundError) is (found by an audit)
    assert isinstance(info.value, OSError) and isinstance(info.value, shvit.WeightsUnavailableError)
    with pytest.raises(RuntimeError) as info:  # a file that is there but corrupt is not "unavailable"
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict={'foo': torch.ones(1)}))
    assert not isinstance(info.value, OSError)


def test_missing_official_release_offline_gets_release_advice(monkeypatch):
    """The in1k_official tag loads the GitHub release file: the advice is that file, not the Hub tag's download."""
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr("timm.models._builder.load_state_dict_from_url", offline)
    monkeypatch.setattr("timm.models._builder.download_cached_file", offline)
    with pytest.raises(RuntimeError, match=r"shvit_s1 from url https://github\.com/ysj9909/SHViT/releases/") as info:
        timm.create_model('shvit_s1.in1k_official', pretrained=True)
    message = str(info.value)
    assert 'download https://github.com/ysj9909/SHViT/releases/download/v1.0/shvit_s1.pth once' in message
    assert 'hf download' not in message


@pytest.mark.parametrize('name', ['nope.safetensors', 'nope.pth'])
def test_missing_local_file(tmp_path, name):
    """A file that does not exist is named as such (timm's own reader raises a bare FileNotFoundError), not as a
    checkpoint to check or convert again; the error is a RuntimeError like every failed load, and a
    FileNotFoundError."""
    path = tmp_path / name
    with pytest.raises(RuntimeError, match=f'weight file {path} does not exist') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, shvit.WeightFileNotFoundError)
    message = str(info.value)
    assert 'shvit_s1' in message and 'pretrained_cfg_overlay=dict(file=' in message
    assert 'complete shvit_s1 checkpoint' not in message and 'convert it again' not in message
    assert 'hf download' not in message  # a local file: no download advice


def test_local_folder_instead_of_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path} is a folder, not a weight file') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path)))
    assert f'local-dir:{tmp_path}' in str(info.value)


@pytest.mark.parametrize('name, data', [
    ('broken.safetensors', b'\x00garbage, not a checkpoint' * 10),
    ('broken.pth', b'\x00garbage, not a checkpoint' * 10),
    ('text.pth', b'junk\n'),  # torch's weights-only unpickler answers this with a bare KeyError
])
def test_corrupt_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(RuntimeError, match='Could not load pretrained weights for shvit_s1') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert 'corrupt' in str(info.value)


def test_damaged_archive_refused_not_loaded(s1_weights, tmp_path):
    """torch.load does not check the archive's CRCs: a damaged .pth loaded its damaged tensors without a word."""
    path = tmp_path / 'damaged.pth'
    torch.save({'model': s1_weights}, path)
    member = damage_largest_member(path)
    with pytest.raises(RuntimeError, match=f'file is corrupt \\(member {member} of the archive fails its CRC') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert not isinstance(info.value, OSError)


def test_truncated_local_file_is_not_unavailable(s1_weights, tmp_path):
    """torch.load answers a truncated .pth with an OSError; the file exists, so it is corrupt, not 'unavailable'
    (was shvit.WeightsUnavailableError, which `except OSError: pretrained=False` fallbacks swallow)."""
    path = tmp_path / 'truncated.pth'
    torch.save(s1_weights, path)
    path.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(RuntimeError, match='Could not load pretrained weights for shvit_s1') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert not isinstance(info.value, OSError)
    assert 'complete shvit_s1 checkpoint' in str(info.value)


def test_non_pretrained_errors_pass_through():
    with pytest.raises(TypeError):
        timm.create_model('shvit_s1', pretrained=False, bogus=1)


def test_build_errors_with_pretrained_are_not_blamed_on_the_weights(tmp_path):
    """An error raised while building the model (here an integer dtype) is the model's own error, also with
    pretrained=True: no 'Could not load pretrained weights' and no advice to download again."""
    with pytest.raises(RuntimeError, match='floating point') as info:
        timm.create_model('shvit_s1', pretrained=True, dtype=torch.int32,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'never-read.safetensors')))
    assert 'Could not load pretrained weights' not in str(info.value)


# shared/reference/shvit.md: exact params (unfused, fused), fvcore fused MMACs, timm's results CSV top-1 / top-5,
# paper Table 2 top-1, written out here as the independent record that the cfg notes are checked against
REFERENCE = {
    'shvit_s1': (224, 6_330_808, 6_308_660, '241.40', '72.780', '91.024', 72.8),
    'shvit_s2': (224, 11_483_072, 11_453_508, '365.51', '75.184', '92.316', 75.2),
    'shvit_s3': (224, 14_245_273, 14_210_010, '600.71', '77.356', '93.310', 77.4),
    'shvit_s4': (256, 16_588_484, 16_546_248, '986.43', '79.362', '94.370', 79.4),
}


@pytest.mark.parametrize('variant', sorted(REFERENCE))
def test_cfg_reference_numbers(variant):
    size, params, fused, mmacs, top1, top5, paper_top1 = REFERENCE[variant]
    cfg = timm.models.get_pretrained_cfg(f'{variant}.in1k')
    assert cfg.input_size == (3, size, size)
    assert cfg.notes == (
        f'params {params:,} (fused {fused:,})',
        f'fvcore fused {mmacs} MMACs at {size}x{size}',
        f'ImageNet-1k top-1 {top1} / top-5 {top5} (timm\'s evaluation of the in1k weights; paper {paper_top1})',
    )


def test_weights_under_another_key_than_model_are_named_not_an_attribute_error():
    """Found by an audit: {'model_ema': ...} alone, or a state dict holding a non-tensor, failed in the filter with
    "AttributeError: 'dict' object has no attribute 'shape'"."""
    model = timm.create_model('shvit_s1')
    with pytest.raises(shvit.CheckpointLayoutError,
                       match=r"under \['model_ema'\] .*torch\.load\(PATH\)\['model_ema'\]"):
        shvit.checkpoint_filter_fn({'model_ema': model.state_dict(), 'epoch': 3}, model)
    with pytest.raises(shvit.CheckpointLayoutError, match=r"1 of its entries are no tensors \(e\.g\. 'epoch': int\)"):
        shvit.checkpoint_filter_fn(dict(model.state_dict(), epoch=3), model)
    assert isinstance(shvit.CheckpointLayoutError(), shvit.CheckpointMismatchError)


@pytest.mark.parametrize('with_anchor', [True, False])
def test_a_key_that_is_not_a_name_is_named_not_an_attribute_error(with_anchor):
    """A mapping with an int key failed with "AttributeError: 'int' object has no attribute 'startswith'", with or
    without the first conv's key that tells an SHViT under a prefix from one at the top."""
    model = timm.create_model('shvit_s1')
    sd = model.state_dict() if with_anchor else {'backbone.x': torch.zeros(1)}
    with pytest.raises(shvit.CheckpointLayoutError, match=r"not a state dict: its key 3 is of type int"):
        shvit.checkpoint_filter_fn({**sd, 3: torch.zeros(1)}, model)


@pytest.mark.parametrize('content', [[torch.zeros(1)], torch.zeros(3)], ids=['list', 'Tensor'])
def test_a_file_that_holds_no_mapping_is_named(tmp_path, content):
    """Found by an audit (a regression of the int-key check below): a file holding a list or a tensor was a
    traceback, "'list' object has no attribute 'get'"."""
    path = tmp_path / 'odd.pth'
    torch.save(content, path)
    kind = type(content).__name__
    with pytest.raises(RuntimeError, match=rf"shvit_s1 from file .*odd\.pth: The checkpoint is not a state dict: it "
                                           rf"holds a {kind}\. Give the state dict of an SHViT"):
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(shvit.CheckpointLayoutError, match=rf"it holds a {kind}\."):
        shvit.checkpoint_filter_fn(content, timm.create_model('shvit_s1'))


def test_a_file_with_a_key_that_is_not_a_name_is_named(tmp_path):
    """Through timm's file loader, whose key cleaning failed first with the same AttributeError."""
    path = tmp_path / 'odd.pth'
    torch.save({**timm.create_model('shvit_s1').state_dict(), 3: torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match=rf"shvit_s1 from file {re.escape(str(path))}: The checkpoint is not a "
                                           r"state dict: its key 3 is of type int"):
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def _stage_outputs(model, x):
    """The three stage maps, computed from the model's parts (not forward_intermediates)."""
    with torch.no_grad():
        y, out = model.patch_embed(x), []
        for stage in model.stages:
            y = stage(y)
            out.append(y)
    return out


def test_a_detectors_checkpoint_gives_its_backbone(tmp_path, s1_weights, s1_reference):
    """Found by an audit: an MMDetection checkpoint (the SHViT under 'backbone.', as in the official
    retinanet_shvit_s4_1x_coco.pth, beside neck and head tensors) was refused as "not an SHViT checkpoint"."""
    body = {k: v for k, v in _to_official(s1_weights).items() if not k.startswith('head')}
    sd = {'backbone.' + k: v for k, v in body.items()}
    sd.update({'neck.lateral_convs.0.conv.weight': torch.randn(8, 320, 1, 1),
               'bbox_head.retina_cls.weight': torch.randn(9, 8, 3, 3)})
    torch.save({'meta': {'mmdet_version': '2.25.0', 'CLASSES': ('person', 'car')}, 'state_dict': sd},
               tmp_path / 'retinanet.pth')
    with pytest.warns(UserWarning, match=rf"under 'backbone\.' in the checkpoint \({len(body)} tensors\); its 2 other "
                                         r"tensors belong to other parts \(e\.g\. \['neck\.lateral_convs"):
        m = timm.create_model('shvit_s1', pretrained=True, features_only=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'retinanet.pth'))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(m(x), _stage_outputs(s1_reference, x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a Lightning module's 'model.' prefix, nothing else beside it: loads without a warning
    lightning = {'state_dict': {'model.' + k: v for k, v in s1_weights.items()}, 'epoch': 3}
    out = shvit.checkpoint_filter_fn(lightning, timm.create_model('shvit_s1', device='meta'))
    assert set(out) == set(s1_weights) and all(out[k] is s1_weights[k] for k in s1_weights)
    # a teacher and a student: which to load is not known
    two = {**{'student.' + k: v for k, v in body.items()}, **{'teacher.' + k: v for k, v in body.items()}}
    with pytest.raises(shvit.CheckpointLayoutError, match=r"holds 2 SHViTs, under \['student\.', 'teacher\.'\]"):
        shvit.checkpoint_filter_fn(two, timm.create_model('shvit_s1', device='meta'))


def test_fused_weights_are_named_and_load_into_a_fused_model(tmp_path, s1_weights, s1_reference):
    """Found by an audit: a fused checkpoint was "not an (unfused) SHViT checkpoint" with the advice to use the
    checkpoint's variant, and an unfused one into a fused model "expected shvit_s1, found shvit_s1"."""
    from timm.models import load_checkpoint
    from timm.utils import reparameterize_model
    import copy

    fused = reparameterize_model(copy.deepcopy(s1_reference))
    torch.save(fused.state_dict(), tmp_path / 'fused.pth')
    with pytest.raises(RuntimeError, match=r"from file .*fused\.pth: The checkpoint holds a fused shvit_s1 "
                                           r"\(BatchNorms folded in.*, and the model is not fused\. "
                                           r".*timm\.create_model\('shvit_s1'\)\.fuse\(\); "
                                           r"model\.load_state_dict\(WEIGHTS\)") as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'fused.pth')))
    assert 'entrypoint' not in str(info.value) and isinstance(info.value.__cause__, shvit.FusionMismatchError)
    # what the message says to do, and the filter into a fused model, give the fused model's output
    x = torch.randn(2, 3, 64, 64)
    for load in (lambda m: m.load_state_dict(torch.load(tmp_path / 'fused.pth')),
                 lambda m: load_checkpoint(m, str(tmp_path / 'fused.pth'), filter_fn=shvit.checkpoint_filter_fn)):
        model = timm.create_model('shvit_s1').eval().fuse()
        load(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), fused(x), rtol=0, atol=0)
    with pytest.raises(shvit.CheckpointMismatchError, match=r'fit the fused model \(a fused shvit_s4 .*Load it into a '
                                                            r'fused shvit_s1 '):
        shvit.checkpoint_filter_fn(fused.state_dict(), timm.create_model('shvit_s4').eval().fuse())
    # found by a review: the same variant built with 10 classes was "expected a fused shvit_s1, found a fused
    # shvit_s1"; and the advice for fused S4 weights into an unfused S1 named shvit_s1
    with pytest.raises(shvit.CheckpointMismatchError, match=r'2 of other shapes \(e\.g\. head\.bias: \[1000\] in the '
                                                            r'checkpoint, \[10\] in the model\)\. It was saved from a '
                                                            r'model built otherwise'):
        shvit.checkpoint_filter_fn(fused.state_dict(), timm.create_model('shvit_s1', num_classes=10).eval().fuse())
    s4 = reparameterize_model(timm.create_model('shvit_s4').eval())
    with pytest.raises(shvit.FusionMismatchError, match=r"a fused shvit_s4 .*timm\.create_model\('shvit_s4'\)\.fuse"):
        shvit.checkpoint_filter_fn(s4.state_dict(), timm.create_model('shvit_s1'))
    model = timm.create_model('shvit_s4').eval().fuse()
    model.load_state_dict(s4.state_dict())  # the advice, followed
    with pytest.raises(shvit.FusionMismatchError, match=r'The model is fused .*and the checkpoint \(shvit_s1\) is '
                                                        r'not: load the checkpoint into the model first, then fuse'):
        shvit.checkpoint_filter_fn({'model': _to_official(s1_weights)}, timm.create_model('shvit_s1').eval().fuse())


@pytest.mark.parametrize('variant', ['shvit_s1', 'revit_t'])
def test_weights_passed_as_something_other_than_a_dict_are_named(variant):
    """Found by an audit: a model (or a list) passed as pretrained_cfg_overlay's state_dict raised timm's bare
    AssertionError, with advice to download from the Hub."""
    model = timm.create_model(variant)
    with pytest.raises(TypeError, match=rf'^pretrained_cfg_overlay state_dict for {variant} must be a state dict '
                                        rf'\(a dict of tensors\) or a training checkpoint holding one, not '
                                        rf'{type(model).__name__} \(a whole model: pass model\.state_dict\(\)\)\.$'):
        timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(state_dict=model))
    with pytest.raises(TypeError, match=r'holding one, not list\.$'):
        timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(state_dict=[1]))
    timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(state_dict=model.state_dict()))


def test_a_pickled_model_gets_advice_that_works(tmp_path, s1_reference):
    """Found by an audit: for torch.save(model) the advice was torch.load(path, weights_only=False)["model"],
    which raises "'SHViT' object is not subscriptable"."""
    torch.save(s1_reference, tmp_path / 'whole.pth')
    with pytest.raises(RuntimeError, match=r'pretrained_cfg_overlay=dict\(state_dict=obj\) for a state dict or '
                                           r'training checkpoint, state_dict=obj\.state_dict\(\) for a whole saved '
                                           r'model') as info:
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'whole.pth')))
    assert '["model"]' not in str(info.value)
    obj = torch.load(tmp_path / 'whole.pth', weights_only=False)  # the advice, followed
    m = timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict=obj.state_dict()))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), s1_reference(x), rtol=0, atol=0)


def test_named_load_errors_arrive_as_their_own_class(tmp_path):
    """Found by an audit: docs/shvit.md names the class of each refused checkpoint (FusionMismatchError for fused
    weights, CheckpointMismatchError for another variant's, ClassifierSizeError for another head), but through
    timm.create_model every one came as a plain RuntimeError, the class only its __cause__; `except` on the named
    class caught nothing. Each stays a RuntimeError."""
    fused = timm.utils.reparameterize_model(timm.create_model('shvit_s1'))
    files = {'fused': fused.state_dict(), 's2': timm.create_model('shvit_s2').state_dict(),
             'head': timm.create_model('shvit_s1', num_classes=10).state_dict()}
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / f'{name}.safetensors')
    for name, error in (('fused', shvit.FusionMismatchError), ('s2', shvit.CheckpointMismatchError),
                        ('head', shvit.checkpoint.ClassifierSizeError)):
        with pytest.raises(error, match=r'^Could not load pretrained weights for shvit_s1 from file '):
            timm.create_model('shvit_s1', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / f'{name}.safetensors')))
        assert issubclass(error, RuntimeError)
    # a local .pth file that holds no state dict, read before timm (found in review: a plain RuntimeError there)
    torch.save([1, 2], tmp_path / 'list.pth')
    with pytest.raises(shvit.CheckpointLayoutError, match=r'^Could not load pretrained weights for shvit_s1 from '):
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'list.pth')))


def test_a_malformed_official_block_key_is_reported_as_extra(s1_weights):
    """Found by an audit: an official-layout key whose downsampler part is no index (blocks2.2.weight) raised a bare
    ValueError from int('weight'); like any other tensor the model does not have, it is named."""
    official = {**_to_official(s1_weights), 'blocks2.2.weight': torch.zeros(1)}
    says = r"Checkpoint has 1 tensor that shvit_s1 does not have \(e\.g\. \['blocks2\.2\.weight'\]\)"
    with pytest.raises(shvit.checkpoint.ExtraTensorsError, match=says):
        timm.create_model('shvit_s1', pretrained=True, pretrained_cfg_overlay=dict(state_dict={'model': official}))
