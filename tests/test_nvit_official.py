"""Official-format NViT checkpoints through the timm factory, against a plain-tensor reference forward.

The checkpoint is built here from the key/shape table of the official ``ft_checkpoint.pth`` (reference nvit.md §2.1)
with made-up, deliberately uneven dims and 5 blocks. The reference forward below follows the paper's equations on the
official tensors directly: rearranged pixels and the 1x1 conv as a matmul, separate Q/K/V scaled per token, scale
64**-0.5, softmax, projection, GELU MLP, LayerNorm eps 1e-6, mean of the two heads.
"""
import argparse
import datetime
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import nvit
from files import damage_largest_member  # tests/files.py

DIM = {'EMB': 48, 'head': [2, 3, 1, 4, 2], 'QK': [8, 16, 8, 4, 12], 'V': [16, 8, 24, 8, 16],
       'MLP': [64, 32, 96, 48, 80]}
PATCH, GRID, NUM_CLASSES = 16, 14, 1000


def make_official(token_mask: str = 'random', seed: int = 0) -> dict:
    """State dict with the official keys and shapes; token_mask: 'random', 'ones' or 'none' (keys absent)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.05, mean=0.):
        return torch.randn(*shape, generator=g) * std + mean

    E, T = DIM['EMB'], GRID * GRID + 2
    sd = {'cls_token': t(1, 1, E, std=.5), 'dist_token': t(1, 1, E, std=.5), 'pos_embed': t(1, T, E, std=.5),
          'patch_embed.proj.weight': t(E, 3 * PATCH * PATCH, 1, 1), 'patch_embed.proj.bias': t(E)}
    for i, (h, qk, v, m) in enumerate(zip(DIM['head'], DIM['QK'], DIM['V'], DIM['MLP'])):
        p = f'blocks.{i}.'
        for n in ('norm1', 'norm2'):
            sd[p + n + '.weight'], sd[p + n + '.bias'] = t(E, std=.1, mean=1.), t(E, std=.1)
        for n, width in (('Q', h * qk), ('K', h * qk), ('V', h * v)):
            sd[p + f'attn.qkv.{n}.weight'], sd[p + f'attn.qkv.{n}.bias'] = t(width, E, std=.2), t(width, std=.1)
        if token_mask == 'random':
            sd[p + 'attn.qkv.token_mask'] = torch.rand(T, 1, generator=g) + 0.5
        elif token_mask == 'ones':
            sd[p + 'attn.qkv.token_mask'] = torch.ones(T, 1)
        sd[p + 'attn.proj.proj.weight'], sd[p + 'attn.proj.proj.bias'] = t(E, h * v, std=.1), t(E)
        sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias'] = t(m, E, std=.1), t(m)
        sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'] = t(E, m, std=.1), t(E)
    sd['norm.weight'], sd['norm.bias'] = t(E, std=.1, mean=1.), t(E, std=.1)
    for n in ('head', 'head_dist'):
        sd[n + '.weight'], sd[n + '.bias'] = t(NUM_CLASSES, E, std=.1), t(NUM_CLASSES)
    return sd


def save_official(path, sd, dim=DIM, **extra):
    torch.save({'model': sd, 'dim': dim, 'args': argparse.Namespace(lr=1e-4, model='nvit'), 'epoch': 299,
                **extra}, path)
    return str(path)


# ---------------------------------------------------------------- independent reference (plain tensor ops)
def _resize_grid(x: torch.Tensor, size) -> torch.Tensor:
    """[1, prefix + g*g, C] -> patch part resized bicubic (antialias, as documented in docs/nvit.md)."""
    prefix, patches = x[:, :2], x[:, 2:]
    c = patches.shape[-1]
    img = patches.reshape(1, GRID, GRID, c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=size, mode='bicubic', align_corners=False, antialias=True)
    return torch.cat([prefix, img.permute(0, 2, 3, 1).reshape(1, -1, c)], dim=1)


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def reference_forward(sd: dict, img: torch.Tensor) -> torch.Tensor:
    B, C, H, W = img.shape
    gh, gw = H // PATCH, W // PATCH
    # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', then the 1x1 conv as a matmul
    x = img.reshape(B, C, gh, PATCH, gw, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, PATCH * PATCH * C)
    x = x @ sd['patch_embed.proj.weight'][:, :, 0, 0].T + sd['patch_embed.proj.bias']
    x = torch.cat([sd['cls_token'].expand(B, -1, -1), sd['dist_token'].expand(B, -1, -1), x], dim=1)
    resize = (gh, gw) != (GRID, GRID)
    x = x + (_resize_grid(sd['pos_embed'], (gh, gw)) if resize else sd['pos_embed'])
    N = x.shape[1]
    for i, (h, qk, v) in enumerate(zip(DIM['head'], DIM['QK'], DIM['V'])):
        p = f'blocks.{i}.'
        y = _ln(x, sd[p + 'norm1.weight'], sd[p + 'norm1.bias'])
        tm = sd.get(p + 'attn.qkv.token_mask')
        if tm is not None and resize:
            tm = _resize_grid(tm[None], (gh, gw))[0]
        qkv = []
        for n, d in (('Q', qk), ('K', qk), ('V', v)):
            z = y @ sd[p + f'attn.qkv.{n}.weight'].T + sd[p + f'attn.qkv.{n}.bias']
            if tm is not None:
                z = z * tm
            qkv.append(z.reshape(B, N, h, d).permute(0, 2, 1, 3))
        q, k, vv = qkv
        attn = torch.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1)
        o = (attn @ vv).permute(0, 2, 1, 3).reshape(B, N, h * v)
        x = x + o @ sd[p + 'attn.proj.proj.weight'].T + sd[p + 'attn.proj.proj.bias']
        y = _ln(x, sd[p + 'norm2.weight'], sd[p + 'norm2.bias'])
        y = y @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias']
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        x = x + y @ sd[p + 'mlp.fc2.weight'].T + sd[p + 'mlp.fc2.bias']
    x = _ln(x, sd['norm.weight'], sd['norm.bias'])
    cls = x[:, 0] @ sd['head.weight'].T + sd['head.bias']
    dist = x[:, 1] @ sd['head_dist.weight'].T + sd['head_dist.bias']
    return (cls + dist) / 2


# ---------------------------------------------------------------- tests
@pytest.fixture(scope='module')
def official_files(tmp_path_factory):
    d = tmp_path_factory.mktemp('nvit_official')
    return {mode: (save_official(d / f'NViT_{mode}.pth', make_official(mode)), make_official(mode))
            for mode in ('random', 'ones', 'none')}


def _create(path, **kw):
    return timm.create_model('nvit_b', pretrained=True, pretrained_cfg_overlay=dict(file=path), **kw).eval()


@pytest.mark.parametrize('mode', ['random', 'ones', 'none'])
def test_official_checkpoint_matches_reference(official_files, mode):
    path, sd = official_files[mode]
    model = _create(path)
    assert model.dims == nvit.NViTDims.from_dict(DIM) and len(model.blocks) == 5
    assert (model.blocks[0].attn.token_mask is not None) == (mode != 'none')
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (model(img) - reference_forward(sd, img)).abs().max().item()
    assert diff <= 1e-5


def test_weights_under_model_ema_only_get_advice_that_works(official_files, tmp_path, capsys):
    """An official checkpoint whose weights are only under 'model_ema' is named as such, with the line that saves
    them beside the dims record (found by an audit: "not an NViT/ViT checkpoint", without advice); following it
    gives the reference model's outputs."""
    from vitzoo.cli import main

    path, sd = official_files['random']
    official = torch.load(path, weights_only=False)
    ema_only = tmp_path / 'ema.pth'
    torch.save({'model_ema': official['model'], 'dim': official['dim']}, ema_only)
    advice = "ck = torch.load(PATH); torch.save({'model': ck['model_ema'], 'dim': ck['dim']}, 'weights.pth')"
    with pytest.raises(nvit.IncompatibleCheckpointError, match="holds its weights under \\['model_ema'\\]") as e:
        _create(str(ema_only))
    assert advice in str(e.value) and 'not an NViT' not in str(e.value)
    assert main(['convert', str(ema_only), '--model', 'nvit_b', '--out', str(tmp_path / 'out'), '--no-flops']) == 1
    assert advice in capsys.readouterr().err
    ck = torch.load(ema_only, weights_only=False)  # the advice, as given
    torch.save({'model': ck['model_ema'], 'dim': ck['dim']}, tmp_path / 'weights.pth')
    img = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (_create(str(tmp_path / 'weights.pth'))(img) - reference_forward(sd, img)).abs().max().item() <= 1e-5


@pytest.mark.parametrize('mode', ['random', 'none'])
def test_official_checkpoint_other_size(official_files, mode):
    path, sd = official_files[mode]
    img = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        ref = reference_forward(sd, img)
        built = _create(path, img_size=(160, 192))  # resampled once, in the pretrained filter
        dynamic = _create(path, dynamic_img_size=True)  # resampled at run time
        assert (built(img) - ref).abs().max().item() <= 1e-5
        assert (dynamic(img) - ref).abs().max().item() <= 1e-5
    if mode == 'random':  # the scales really were resampled, not dropped
        assert built.blocks[0].attn.token_mask.shape == (2 + 10 * 12, 1)
        assert built.blocks[0].attn.token_mask.std() > 0.05


def test_load_checkpoint_api(official_files):
    path, sd = official_files['random']
    state_dict, dims, meta = nvit.load_checkpoint(path)
    assert dims == nvit.NViTDims.from_dict(DIM)
    assert meta['format'] == 'official' and '"lr": "0.0001"' in meta['args']
    assert state_dict['blocks.1.attn.qkv.weight'].shape == (3 * (16 + 16 + 8), 48)
    assert torch.equal(state_dict['blocks.1.attn.token_mask'], sd['blocks.1.attn.qkv.token_mask'])
    # dims_from_state_dict needs only the head counts; the record and the shapes agree
    assert nvit.dims_from_state_dict(sd, heads=DIM['head']) == dims
    assert nvit.dims_from_state_dict(state_dict, heads=DIM['head']) == dims
    # a head count of 0 (or not a whole number) is named, not a ZeroDivisionError (found by an audit)
    for bad in (0, [DIM['head'][0], 0] + DIM['head'][2:], 1.5):
        with pytest.raises(ValueError, match=r'head count must be a whole number >= 1'):
            nvit.dims_from_state_dict(state_dict, heads=bad)


def test_patch_embed_conversion_is_the_rearrange():
    """The converted 16x16 conv equals rearrange + 1x1 conv on an image (channel order (p1 p2 c))."""
    sd = make_official('none')
    conv_w = nvit.convert_official(sd)['patch_embed.proj.weight']
    img = torch.randn(1, 3, 32, 48)
    conv = F.conv2d(img, conv_w, stride=16).flatten(2).transpose(1, 2)
    flat = img.reshape(1, 3, 2, 16, 3, 16).permute(0, 2, 4, 3, 5, 1).reshape(1, 6, 768)
    assert torch.allclose(conv, flat @ sd['patch_embed.proj.weight'][:, :, 0, 0].T, atol=1e-5)


def test_ours_safetensors_roundtrip(official_files, tmp_path):
    from safetensors.torch import save_file
    path, sd = official_files['random']
    model = _create(path)
    out = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(out), metadata=nvit.dims_metadata(model))
    again = _create(str(out))
    assert again.dims == model.dims
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (again(img) - reference_forward(sd, img)).abs().max().item() <= 1e-5
    # timm's own save_for_hf / local-dir route: config.json model_args carry the dims
    timm.models.save_for_hf(model, str(tmp_path / 'hf'), safe_serialization=True)
    local = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True).eval()
    assert local.dims == model.dims
    with torch.no_grad():
        assert torch.equal(local(img), again(img))


def test_timms_checkpoint_path_takes_our_layout_not_the_official_one(official_files, tmp_path):
    """docs/nvit.md: timm's checkpoint_path= loads a file in our layout (the reference forward's output; dims must be
    given, timm reads no record there) and refuses an official one with the missing keys (timm applies no filter on
    that route), so the docs send official files through pretrained_cfg_overlay=dict(file=...)."""
    path, sd = official_files['random']
    ours = tmp_path / 'ours.pth'
    torch.save(_create(path).state_dict(), ours)
    model = timm.create_model('nvit_b', dims=DIM, checkpoint_path=str(ours)).eval()
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(img) - reference_forward(sd, img)).abs().max().item() <= 1e-5
    with pytest.raises(RuntimeError, match='Missing key'):
        timm.create_model('nvit_b', dims=DIM, checkpoint_path=path)


@pytest.mark.parametrize('record', ['json', 'dict', 'official-dict'])
def test_ours_torch_save_with_dims_record(official_files, tmp_path, record):
    """A torch.save'd flat state dict carrying the dims under 'nvit_dims' (as a JSON string or a dict, either key
    style) loads with those dims and the same tensors (found by an audit: untested)."""
    path, sd = official_files['random']
    model = _create(path)
    dims = {'json': model.dims.to_json(), 'dict': model.dims.to_dict(),
            'official-dict': model.dims.to_dict(official=True)}[record]
    out = tmp_path / 'ours.pth'
    torch.save({**model.state_dict(), 'nvit_dims': dims}, out)
    state_dict, got_dims, meta = nvit.load_checkpoint(out)
    assert got_dims == nvit.NViTDims.from_dict(DIM) and meta == {'format': 'nvit'}
    expected = model.state_dict()
    assert sorted(state_dict) == sorted(expected)
    assert all(torch.equal(state_dict[k], expected[k]) for k in expected)
    again = _create(str(out))  # the factory takes the dims from the file too (none given here)
    assert again.dims == nvit.NViTDims.from_dict(DIM)
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (again(img) - reference_forward(sd, img)).abs().max().item() <= 1e-5


def test_num_classes_change_drops_heads(official_files):
    path, _ = official_files['ones']
    model = _create(path, num_classes=7)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 7)


# ---------------------------------------------------------------- bad inputs
def test_shvit_checkpoint_rejected(tmp_path):
    sd = {'patch_embed.0.c.weight': torch.zeros(16, 3, 3, 3), 'patch_embed.0.bn.weight': torch.ones(16),
          'stages.0.blocks.0.mixer.m.weight': torch.zeros(4)}
    path = tmp_path / 'shvit.pth'
    torch.save({'model': sd}, path)
    with pytest.raises(ValueError, match='SHViT checkpoint'):
        _create(str(path))


def test_deit_checkpoint_rejected(tmp_path):
    from timm.models.deit import VisionTransformerDistilled
    deit = VisionTransformerDistilled(embed_dim=32, depth=2, num_heads=2, num_classes=10)
    path = tmp_path / 'deit.pth'
    torch.save({'model': deit.state_dict()}, path)
    with pytest.raises(ValueError, match='looks like a timm ViT/DeiT checkpoint'):
        _create(str(path))


@pytest.mark.parametrize('variant', ['nvit_b', 'revit_t'])
def test_a_pruning_time_checkpoint_is_named_and_not_told_to_pass_dims(tmp_path, variant):
    """The official pruning-time format (full-size, zeroed, per-head Q/K/V of shape [64, 768, heads] and a head_mask,
    the reference nvit.md, section 2.3) was called a timm ViT and told to pass dims= (nvit_b), or compared its 3-D
    weights with the dims as if they were dense (revit_t): neither can load it."""
    sd = {'cls_token': torch.zeros(1, 1, 768), 'pos_embed': torch.zeros(1, 198, 768),
          'patch_embed.proj.weight': torch.zeros(768, 3, 16, 16)}
    for part in 'QKV':
        sd[f'blocks.0.attn.qkv.{part}.weight'] = torch.zeros(64, 768, 12)
        sd[f'blocks.0.attn.qkv.{part}.bias'] = torch.zeros(64, 12)
    sd['blocks.0.attn.qkv.head_mask.weight'] = torch.ones(12, 1)
    sd['blocks.0.attn.proj.weight'] = torch.zeros(768, 64, 12)
    path = tmp_path / 'pruned_checkpoint.pth'
    torch.save({'model': sd, 'epoch': 3}, path)
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r'is an NViT pruning-time checkpoint .*finetune_dense'):
        timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(nvit.IncompatibleCheckpointError, match='pruning-time'):
        nvit.load_checkpoint(str(path))


@pytest.mark.parametrize('dtype', [torch.int32, torch.bool])
def test_integer_or_boolean_weights_are_refused_not_cast(tmp_path, dtype):
    """Found by an audit: load_state_dict cast an int32 or bool checkpoint into the float weights."""
    sd = make_official('ones')
    key = next(k for k, v in sd.items() if k.endswith('mlp.fc1.weight'))
    sd[key] = sd[key].to(dtype)
    path = save_official(tmp_path / 'NViT_cast.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError,
                       match=rf"Checkpoint tensor {re.escape(key)} is {re.escape(str(dtype))} where the model's is "
                             r"torch\.float32 \(1 such tensor"):
        _create(path)


def test_a_dict_with_a_key_that_is_no_name_is_not_a_state_dict(tmp_path):
    """Found by an audit: an int key among the weights was an AttributeError traceback ('int' object has no
    attribute 'startswith'), in `vitzoo convert` too."""
    sd = make_official('ones')
    sd[0] = torch.zeros(1)
    path = save_official(tmp_path / 'NViT_int_key.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r"is not a state dict: its key 0 is of type int"):
        _create(path)


def test_the_advice_for_a_vit_checkpoint_with_heads_not_64_wide_is_exact(tmp_path):
    """The error's second way (dims=NViTDims.uniform) keeps NViT's 64**-0.5 attention scale: for 48-wide heads the
    message's attn_scale=head_dim**-0.5 gives the ViT's outputs (found by an audit: the advice left it out, and the
    load was silently off by 4e-3). The reference is timm's ViT itself."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', depth=2, num_heads=4).eval()  # heads 48 wide
    path = tmp_path / 'vit.pth'
    torch.save(vit.state_dict(), path)
    with pytest.raises(ValueError, match=r'pass attn_scale=head_dim\*\*-0\.5 too, or use from_vit'):
        _create(str(path))
    x = torch.randn(2, 3, 224, 224)
    for scale, exact in ((None, False), (48 ** -0.5, True)):
        kwargs = {} if scale is None else {'attn_scale': scale}
        model = timm.create_model('nvit_b', pretrained=True, dims=nvit.NViTDims.uniform(192, 2, 4, 48, 768),
                                  pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
        with torch.no_grad():
            diff = (model(x) - vit(x)).abs().max().item()
        assert (diff < 1e-5) == exact, (scale, diff)


def test_truncated_file(official_files, tmp_path):
    data = open(official_files['none'][0], 'rb').read()
    path = tmp_path / 'truncated.pth'
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match='truncated or corrupt'):
        _create(str(path))
    bad = tmp_path / 'truncated.safetensors'
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
    with pytest.raises(RuntimeError, match='truncated or corrupt'):
        nvit.load_checkpoint(bad)
    text = tmp_path / 'text.pth'
    text.write_bytes(b'junk\n')  # torch's weights-only unpickler answers this with a bare KeyError
    with pytest.raises(RuntimeError, match="Cannot read checkpoint .*text.pth.*truncated or corrupt"):
        _create(str(text))


def test_damaged_archive_refused_not_loaded(official_files, tmp_path):
    """torch.load skips the archive's CRCs: a damaged .pth loaded its damaged tensors through the factory."""
    path = tmp_path / 'damaged.pth'
    path.write_bytes(open(official_files['random'][0], 'rb').read())
    member = damage_largest_member(path)
    for load in (lambda: _create(str(path)), lambda: nvit.load_checkpoint(path)):
        with pytest.raises(RuntimeError, match=f'is corrupt: member {member} of the archive fails its CRC check'):
            load()


def test_unsafe_pickle_refused(tmp_path):
    path = save_official(tmp_path / 'unsafe.pth', make_official('none'), when=datetime.date(2023, 1, 1))
    with pytest.raises(RuntimeError, match=r'Refusing to load .*datetime\.date'):
        _create(path)


def test_dims_record_does_not_match_weights(tmp_path):
    wrong = dict(DIM, MLP=[64, 32, 96, 48, 81])
    path = save_official(tmp_path / 'wrong.pth', make_official('none'), dim=wrong)
    with pytest.raises(ValueError, match=r'do not match the checkpoint weights: block 4'):
        _create(path)


def test_given_dims_do_not_match(official_files):
    path, _ = official_files['none']
    other = dict(DIM, head=[1, 3, 1, 4, 2], QK=[16, 16, 8, 4, 12], V=[32, 8, 24, 8, 16])
    with pytest.raises(ValueError, match=r"dims record differs from the dims=... given at block 0: heads 1 vs"):
        _create(path, dims=other)


def test_plain_state_dict_needs_dims(official_files, tmp_path):
    _, sd = official_files['ones']
    path = tmp_path / 'plain.pth'
    torch.save(nvit.convert_official(sd), path)
    with pytest.raises(ValueError, match='no NViT dims record'):
        _create(str(path))
    model = _create(str(path), dims=DIM)  # official key style accepted
    assert model.dims.heads == tuple(DIM['head'])
    with pytest.raises(ValueError, match='do not match the checkpoint weights'):
        _create(str(path), dims=dict(DIM, EMB=64))


def test_url_and_hf_hub_sources(official_files, tmp_path):
    """pretrained=True resolves url (here file://, no network) and hf_hub_id (prepopulated offline cache)."""
    from safetensors.torch import save_file
    path, sd = official_files['ones']
    img = torch.randn(1, 3, 224, 224)
    ref = reference_forward(sd, img)
    url = timm.create_model('nvit_b', pretrained=True, cache_dir=str(tmp_path / 'torch'),
                            pretrained_cfg_overlay=dict(url=f'file://{path}')).eval()
    snapshot = tmp_path / 'hf' / 'models--org--nvit-test' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / 'hf' / 'models--org--nvit-test' / 'refs').mkdir()
    (tmp_path / 'hf' / 'models--org--nvit-test' / 'refs' / 'main').write_text('0' * 40)
    save_file(url.state_dict(), str(snapshot / 'model.safetensors'), metadata=nvit.dims_metadata(url))
    hub = timm.create_model('nvit_b', pretrained=True, cache_dir=str(tmp_path / 'hf'),
                            pretrained_cfg_overlay=dict(hf_hub_id='org/nvit-test')).eval()
    with torch.no_grad():
        assert (url(img) - ref).abs().max().item() <= 1e-5
        assert torch.equal(hub(img), url(img))


def test_unreachable_url_names_the_url_and_the_fix(tmp_path):
    url = 'http://127.0.0.1:9/NViT_B.pth'  # loopback, nothing listens on the discard port: refused at once
    with pytest.raises(RuntimeError, match=r'nvit_b checkpoint from http://127\.0\.0\.1:9/NViT_B\.pth') as info:
        timm.create_model('nvit_b', pretrained=True, cache_dir=str(tmp_path), pretrained_cfg_overlay=dict(url=url))
    assert 'pretrained_cfg_overlay=dict(file=' in str(info.value)
    # an OSError too, as timm's own download errors are: `except OSError` fallbacks work (found by an audit)
    assert isinstance(info.value, OSError) and isinstance(info.value, nvit.WeightsUnavailableError)


def test_official_checkpoint_loads_strictly_into_a_model_built_without_weights(official_files):
    """nvit_b built from the dims alone has the released architecture: an official checkpoint (token scales and
    distillation token) loads into it strictly, every key used, and gives the reference outputs."""
    path, sd = official_files['random']
    model = timm.create_model('nvit_b', dims=DIM).eval()
    model.load_state_dict(nvit.convert_official(sd), strict=True)
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(img) - reference_forward(sd, img)).abs().max().item() <= 1e-5


@pytest.mark.parametrize('variant', ['nvit_b', 'nvit_t'])
def test_missing_file_and_folder_say_so(tmp_path, variant):
    missing = tmp_path / 'NViT_B.pth'
    with pytest.raises(FileNotFoundError, match=f"weight file '{missing}' does not exist"):
        timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}' is a folder, not an NViT weight file") as info:
        timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path)))
    assert f'local-dir:{tmp_path}' in str(info.value)


def test_hub_miss_offline_says_what_to_do(tmp_path, monkeypatch):
    """An hf_hub_id source neither in the Hub cache nor reachable names the repo, the download command and the
    local-file alternative; online (the Hub unreachable) it also says how to fail at once instead of retrying."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    kwargs = dict(pretrained=True, cache_dir=str(tmp_path), pretrained_cfg_overlay=dict(hf_hub_id='org/nvit-none'))
    with pytest.raises(FileNotFoundError, match=r"(?s)nvit_b: no weight file of Hub repo 'org/nvit-none'.*"
                                                r"hf download org/nvit-none model\.safetensors.*dict\(file=") as info:
        timm.create_model('nvit_b', **kwargs)
    assert 'set HF_HUB_OFFLINE=1' not in str(info.value)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    unreachable = 'http://127.0.0.1:9'  # nothing listens: refused at once; the client's retry waits are skipped
    monkeypatch.setattr(constants, 'ENDPOINT', unreachable)
    template = unreachable + '/{repo_id}/resolve/{revision}/{filename}'
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', template)
    waits = []
    monkeypatch.setattr(_http.time, 'sleep', waits.append)
    with pytest.raises(FileNotFoundError, match=r'(?s)cannot be reached \(HF_HUB_OFFLINE=0\).*set HF_HUB_OFFLINE=1.*'
                                                r'\(46 s or more: '):
        timm.create_model('nvit_b', **kwargs)
    assert sum(waits) == 46  # the two file names' retry waits, as the message says
    waits.clear()
    one = dict(kwargs, pretrained_cfg_overlay=dict(hf_hub_id='org/nvit-none', hf_hub_filename='model.safetensors'))
    with pytest.raises(FileNotFoundError, match=r'\(23 s or more: '):  # one file tried (said 46 s; a review)
        timm.create_model('nvit_b', **one)
    assert sum(waits) == 23


# ---------------------------------------------------------------- loading into another configuration
@pytest.mark.parametrize('num_classes', [1000, 7])
@pytest.mark.parametrize('dropped', ['blocks.1.mlp.fc2.weight', 'norm.weight', 'cls_token', 'patch_embed.proj.weight'])
def test_incomplete_checkpoint_refused_with_any_num_classes(tmp_path, num_classes, dropped):
    """timm loads non-strictly when num_classes differs (it drops the classifiers); a missing tensor must still be
    an error, not a random-init gap."""
    sd = make_official('ones')
    del sd[dropped]
    path = save_official(tmp_path / 'NViT_incomplete.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError,
                       match=r"^The checkpoint is incomplete: 1 of the model's tensors are missing") as info:
        _create(path, num_classes=num_classes)
    assert f"(e.g. ['{dropped}'])" in str(info.value)


@pytest.mark.parametrize('dropped', ['blocks.0.attn.qkv.K.weight', 'blocks.1.attn.qkv.V.bias',
                                     'blocks.0.attn.qkv.Q.weight'])
@pytest.mark.parametrize('strict', [True, False])
def test_an_official_block_without_one_of_q_k_v_is_named(tmp_path, dropped, strict):
    """The official file stores Q, K and V apart and the loader merges them into one qkv. Before 2026-11-26 a missing
    K or V was a bare KeyError (a traceback in `vitzoo convert`), and a missing Q silently dropped K and V as well,
    so the error named the merged key, which no official file has."""
    sd = make_official('ones')
    del sd[dropped]
    path = save_official(tmp_path / 'NViT_no_qkv_part.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError, match=rf"^Official-layout NViT checkpoint without "
                                                               rf"\['{re.escape(dropped)}'\]: a block needs its Q, K"):
        _create(path, pretrained_strict=strict)


@pytest.mark.parametrize('change', ['stray tensor of a block beyond', 'block without its first MLP weight'])
def test_an_incomplete_block_is_named_as_such(tmp_path, change):
    """Found by an audit: a stray blocks.5.* tensor in a 5-block file was "Not an NViT state dict: missing key
    'blocks.5.attn.qkv.weight'", as if the file were another model's."""
    sd = make_official('ones')
    if change.startswith('stray'):
        sd['blocks.5.norm1.weight'] = torch.ones(DIM['EMB'])
        block, missing = 5, 'blocks.5.attn.qkv.weight'
    else:
        del sd['blocks.2.mlp.fc1.weight']
        block, missing = 2, 'blocks.2.mlp.fc1.weight'
    path = save_official(tmp_path / 'NViT_odd_block.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError,
                       match=rf"^Block {block} of the checkpoint is incomplete: .* but not '{re.escape(missing)}'"):
        nvit.load_checkpoint(str(path))


@pytest.mark.parametrize('dropped, message', [
    ('head_dist', r"is distilled \(it has dist_token\) and has its classifier \(head\) but not the distillation head"),
    ('dist_token', r"has a distillation head \(head_dist\) but no distillation token \(dist_token\)")])
def test_a_distilled_file_missing_its_token_or_its_head_is_named(tmp_path, dropped, message):
    """Found by an audit: a distilled file without head_dist got torch's raw "Missing key(s)" list, one without
    dist_token a "197 patch tokens, not a square grid" error (from its 198 position embeddings)."""
    sd = make_official('ones')
    for key in [k for k in sd if k.split('.')[0] == dropped]:
        del sd[key]
    path = save_official(tmp_path / 'NViT_half_distilled.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError, match=message):
        _create(path)


def test_a_state_dict_without_pos_embed_is_not_nvit():
    """Found by the review: the incomplete-block message above raised an UnboundLocalError when pos_embed was the
    missing key."""
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r"^Not an NViT state dict: missing key 'pos_embed'"):
        nvit.dims_from_state_dict({'blocks.0.attn.qkv.weight': torch.zeros(6, 4)}, heads=1)


def test_official_q_k_v_of_different_input_widths_are_named(tmp_path):
    sd = make_official('ones')
    sd['blocks.1.attn.qkv.Q.weight'] = sd['blocks.1.attn.qkv.Q.weight'][:, :-1]
    path = save_official(tmp_path / 'NViT_odd_q.pth', sd)
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r"Q, K and V of blocks\.1 take inputs of different "
                                                               r"widths \(blocks\.1\.attn\.qkv\.Q\.weight"):
        _create(path)


def test_checkpoint_without_token_scales_into_a_token_scale_model(official_files):
    path, _ = official_files['none']
    with pytest.raises(ValueError, match='token_mask=False'):
        _create(path, token_mask=True, num_classes=7)


def test_distilled_mismatch_names_the_distillation_token(official_files, tmp_path):
    path, sd = official_files['ones']
    with pytest.raises(ValueError, match='checkpoint is distilled .* distilled=True'):
        _create(path, distilled=False)
    plain = {k: v for k, v in sd.items() if not k.startswith(('dist_token', 'head_dist'))}
    plain['pos_embed'] = torch.cat([sd['pos_embed'][:, :1], sd['pos_embed'][:, 2:]], dim=1)
    for k in [k for k in plain if k.endswith('token_mask')]:
        plain[k] = torch.cat([plain[k][:1], plain[k][2:]])
    plain_path = save_official(tmp_path / 'NViT_plain.pth', plain)
    assert _create(plain_path).num_prefix_tokens == 1  # picked from the checkpoint
    with pytest.raises(ValueError, match='not distilled .* distilled=False'):
        _create(plain_path, distilled=True)


def test_other_patch_size_resamples_the_patch_embedding(official_files):
    """FlexiViT's property (timm ViT's loader resamples the same way): the patch-32 embedding of a 16x16 patch
    resized (bicubic) to 32x32 equals the checkpoint's patch-16 embedding of the patch itself."""
    path, sd = official_files['ones']
    model = _create(path, patch_size=32, img_size=448)
    w16 = sd['patch_embed.proj.weight'][:, :, 0, 0].double()  # (p1 p2 c) order, as the reference uses
    w32 = model.patch_embed.proj.weight.double()
    assert w32.shape[-2:] == (32, 32)
    patches = torch.randn(5, 3, PATCH, PATCH, dtype=torch.float64)
    expected = patches.permute(0, 2, 3, 1).reshape(5, -1) @ w16.T
    big = F.interpolate(patches, size=(32, 32), mode='bicubic', align_corners=False, antialias=True)
    got = (big.reshape(5, 1, -1) * w32.reshape(1, w32.shape[0], -1)).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert model(torch.randn(1, 3, 448, 448)).shape == (1, NUM_CLASSES)


def test_classifier_of_another_size_says_which_num_classes(tmp_path):
    from vitzoo.hub import WeightsError, load_pretrained_model
    sd = make_official('ones')
    for name in ('head', 'head_dist'):
        sd[name + '.weight'], sd[name + '.bias'] = sd[name + '.weight'][:10], sd[name + '.bias'][:10]
    path = save_official(tmp_path / 'NViT_10.pth', sd)
    with pytest.raises(WeightsError, match=r"classifier \(head\) has 10 outputs, the model's 1000\. To load it, "
                                           r"give the count to the model and to its pretrained cfg: "
                                           r"timm\.create_model\(\.\.\., pretrained=True, num_classes=10, "
                                           r"pretrained_cfg_overlay=dict\(file=\.\.\., num_classes=10\)\)"
                                           r".*--num-classes 10") as info:
        load_pretrained_model('nvit_t', pretrained_cfg_overlay=dict(file=path))
    assert 'another model' not in str(info.value)
    model = timm.create_model('nvit_t', pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=path, num_classes=10))
    torch.testing.assert_close(model.head.weight, sd['head.weight'], rtol=0, atol=0)
    alone = timm.create_model('nvit_t', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))
    assert not torch.equal(alone.head.weight, sd['head.weight'])  # num_classes alone: timm's new classifier


def test_features_only_takes_a_fine_tuned_or_headless_checkpoint(tmp_path):
    """Found by an audit: features_only=True (timm drops the classifiers) refused a 10-class checkpoint as a
    classifier of the wrong size; a headless one with the cfg's 1000 classes now says what to pass."""
    sd = make_official('ones')
    ten = dict(sd)
    for name in ('head', 'head_dist'):
        ten[name + '.weight'], ten[name + '.bias'] = sd[name + '.weight'][:10], sd[name + '.bias'][:10]
    headless = {k: v for k, v in sd.items() if not k.startswith(('head.', 'head_dist.'))}
    for i, weights in enumerate((ten, headless)):
        path = save_official(tmp_path / f'NViT_{i}.pth', weights)
        model = timm.create_model('nvit_t', pretrained=True, features_only=True,
                                  pretrained_cfg_overlay=dict(file=path))
        torch.testing.assert_close(model.model.pos_embed, sd['pos_embed'], rtol=0, atol=0)
        torch.testing.assert_close(model.model.blocks[2].mlp.fc1.weight, sd['blocks.2.mlp.fc1.weight'],
                                   rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"no classifier \(head\).*num_classes=0"):
        timm.create_model('nvit_t', pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert timm.create_model('nvit_t', pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=path)).num_classes == 0


def test_no_token_scale_hint_when_other_tensors_are_missing_too(tmp_path):
    """Only token scales missing: the token_mask=False hint. Token scales and a weight missing: no hint, since
    token_mask=False would not make that checkpoint load."""
    sd = make_official('none')
    del sd['blocks.1.mlp.fc2.weight']
    path = save_official(tmp_path / 'NViT_no_scales_no_fc2.pth', sd)
    with pytest.raises(ValueError, match='incomplete') as info:
        _create(path, token_mask=True, num_classes=7)
    assert 'token_mask=False' not in str(info.value)
    assert 'blocks.0.attn.token_mask' in str(info.value)


def test_token_scales_into_a_model_without_them_name_token_mask(tmp_path):
    """A checkpoint with token scales loaded into a token_mask=False model: named, with the fix (was torch's bare
    unexpected-keys list); following the advice loads it."""
    sd = make_official('random')
    path = save_official(tmp_path / 'NViT_scales.pth', sd)
    with pytest.raises(ValueError, match=r'token scales \(5 attn.token_mask.*token_mask=True'):
        _create(path, token_mask=False)
    model = _create(path, token_mask=True)
    torch.testing.assert_close(model.blocks[3].attn.token_mask.detach(), sd['blocks.3.attn.qkv.token_mask'],
                               rtol=0, atol=0)


def test_extra_tensors_refused_also_when_num_classes_differs(tmp_path):
    """With another num_classes timm loads non-strictly; a tensor the model lacks must not be skipped silently
    (was: loaded, with only timm's logged 'Unexpected keys' line)."""
    sd = make_official('random')
    sd['extra.weight'] = torch.ones(3)
    path = save_official(tmp_path / 'NViT_extra.pth', sd)
    for num_classes in (7, 1000):
        with pytest.raises(ValueError, match=r"1 tensor that the model does not have.*extra.weight"):
            _create(path, num_classes=num_classes)


@pytest.mark.parametrize('layout', ['ddp', 'compile', 'timm-train', 'ddp-compile'])
def test_wrapped_checkpoints_load_like_the_plain_one(official_files, tmp_path, layout):
    """DDP (``module.``), torch.compile (``_orig_mod.``) and timm train.py (``state_dict``) wrappings are unwrapped:
    the same tensors as the plain official file, through load_checkpoint, the factory and the filter (audit)."""
    path, sd = official_files['random']
    plain = _create(path).state_dict()
    ours = {k: v for k, v in plain.items()}
    out = tmp_path / f'{layout}.pth'
    if layout == 'ddp':
        torch.save({'model': {'module.' + k: v for k, v in sd.items()}, 'dim': DIM}, out)
    elif layout == 'compile':
        torch.save({**{'_orig_mod.' + k: v for k, v in ours.items()}, 'nvit_dims': DIM}, out)
    elif layout == 'timm-train':
        torch.save({'state_dict': ours, 'nvit_dims': DIM, 'arch': 'nvit_b', 'epoch': 3}, out)
    else:
        torch.save({'model': {'module._orig_mod.' + k: v for k, v in sd.items()}, 'dim': DIM}, out)
    state_dict, dims, _ = nvit.load_checkpoint(out)
    assert dims == nvit.NViTDims.from_dict(DIM)
    assert sorted(state_dict) == sorted(plain)
    assert all(torch.equal(state_dict[k], plain[k]) for k in plain)
    got = _create(str(out)).state_dict()
    assert sorted(got) == sorted(plain) and all(torch.equal(got[k], plain[k]) for k in plain)
    raw = torch.load(out, weights_only=True)
    filtered = nvit.checkpoint_filter_fn(raw, _create(path))
    assert all(torch.equal(filtered[k], plain[k]) for k in plain)


def test_a_detectors_checkpoint_gives_its_backbone(tmp_path):
    """Found by an audit (of SHViT; NViT likewise): an NViT under 'backbone.' beside a detector's neck and head
    tensors (MMDetection's layout) was "not an NViT/ViT checkpoint"."""
    sd = make_official('random')
    wrapped = {'backbone.' + k: v for k, v in sd.items()}
    wrapped['neck.lateral_convs.0.conv.weight'] = torch.randn(8, DIM['EMB'], 1, 1)
    path = save_official(tmp_path / 'det.pth', wrapped)
    with pytest.warns(UserWarning, match=rf"the ViT under 'backbone\.' in .*det\.pth \({len(sd)} tensors\); its 1 "
                                         r"other tensors belong to other parts \(e\.g\. \['neck\.lateral"):
        model = _create(path)
    img = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(img), reference_forward(sd, img), rtol=1e-4, atol=1e-5)
    # the filter itself (timm's load_checkpoint(model, path, filter_fn=...)) takes it too (found by a review)
    with pytest.warns(UserWarning, match=r"the ViT under 'backbone\.'"):
        filtered = nvit.checkpoint_filter_fn({'model': wrapped}, model)
    assert set(filtered) == set(model.state_dict())
    two = {**{'student.' + k: v for k, v in sd.items()}, **{'teacher.' + k: v for k, v in sd.items()}}
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r"holds 2 ViTs, under \['student\.', 'teacher\.'\]"):
        nvit.checkpoint.read_checkpoint_object({'model': two})
    # found by a review: NesT's levels.N.pos_embed were taken for 3 ViTs; a prefix needs blocks.N.* under it
    nest = timm.create_model('nest_tiny', num_classes=0).state_dict()
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r'not an NViT/ViT checkpoint \(no blocks\.N\.\* / '
                                                               r'pos_embed keys'):
        nvit.checkpoint.read_checkpoint_object(nest)


def test_a_model_cut_to_fewer_blocks_loads_non_strictly(tmp_path):
    """Found by an audit: with pretrained_strict=False, a dims= of the file's first 3 blocks was refused as differing
    from the file's 5-block record, where docs/nvit.md says the blocks beyond the model's depth are skipped. The
    reference is the whole file loaded strictly (itself checked against plain tensor ops above)."""
    path = save_official(tmp_path / 'NViT_cut.pth', make_official('ones'))
    first3 = dict(embed_dim=DIM['EMB'], heads=DIM['head'][:3], qk_dim=DIM['QK'][:3], v_dim=DIM['V'][:3],
                  mlp_dim=DIM['MLP'][:3])
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r"differs from the dims=\.\.\. given at depth 3 vs 5"):
        _create(path, dims=first3)
    with pytest.warns(UserWarning, match=r'Partial NViT load \(pretrained_strict=False\)'):
        cut = _create(path, dims=first3, pretrained_strict=False)
    whole = _create(path).state_dict()
    got = cut.state_dict()
    assert all(torch.equal(got[k], whole[k]) for k in got), [k for k in got if not torch.equal(got[k], whole[k])]
    other = dict(first3, mlp_dim=[64, 32, 95])  # a block both have differs: refused whatever the strictness
    with pytest.raises(nvit.IncompatibleCheckpointError, match=r"given at block 2: mlp_dim 95 vs 96"):
        _create(path, dims=other, pretrained_strict=False)
