"""The dims record, the ReViT rule, and params / FLOPs of revit_* by formula."""
import json
import math

import pytest
import timm
import torch

import nvit
from nvit import NViTDims, revit_dims

UNEVEN = NViTDims(48, [2, 3, 1], [8, 16, 8], [16, 8, 24], [64, 32, 96])


def test_record_roundtrip_and_keys():
    d = UNEVEN
    assert d.depth == 3 and d.block(1) == {'heads': 3, 'qk_dim': 16, 'v_dim': 8, 'mlp_dim': 32}
    assert NViTDims.from_json(d.to_json()) == d
    assert json.loads(d.to_json())['heads'] == [2, 3, 1]
    official = d.to_dict(official=True)
    assert set(official) == {'EMB', 'head', 'QK', 'V', 'MLP'}
    assert NViTDims.from_dict(official) == d
    assert '    1     3      16      8     32' in str(d)


@pytest.mark.parametrize('bad, err, match', [
    (dict(embed_dim=48, heads=[2, 3], qk_dim=[8], v_dim=[8, 8], mlp_dim=[8, 8]), ValueError, 'one entry per block'),
    (dict(embed_dim=48, heads=[2, 0], qk_dim=[8, 8], v_dim=[8, 8], mlp_dim=[8, 8]), ValueError,
     r'heads\[1\] must be >= 1'),
    (dict(embed_dim=48.0, heads=[2], qk_dim=[8], v_dim=[8], mlp_dim=[8]), TypeError, 'embed_dim must be an int'),
    (dict(embed_dim=48, heads=[], qk_dim=[], v_dim=[], mlp_dim=[]), ValueError, 'at least one block'),
    (dict(embed_dim=48, heads=2, qk_dim=[8], v_dim=[8], mlp_dim=[8]), TypeError, 'heads must be a list'),
])
def test_record_validation(bad, err, match):
    with pytest.raises(err, match=match):
        NViTDims(**bad)


def test_from_dict_rejects_mixed_keys():
    with pytest.raises(ValueError, match='neither'):
        NViTDims.from_dict({'EMB': 48, 'heads': [1], 'QK': [8], 'V': [8], 'MLP': [8]})
    with pytest.raises(ValueError, match='not valid JSON'):
        NViTDims.from_json('{EMB')


def test_revit_dims_match_the_code_rule():
    """Values written out in the reference (§1.5), from revit_scratch.py."""
    t = revit_dims(176)
    assert list(t.heads) == [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10]
    assert list(t.qk_dim) == [16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16]
    assert list(t.v_dim) == [64] * 12
    assert list(t.mlp_dim) == [528] * 3 + [1056] * 6 + [528] * 3
    s = revit_dims(384)
    assert list(s.heads) == [10, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 10]
    assert list(s.qk_dim) == [32, 16, 16, 32, 32, 32, 32, 32, 32, 16, 16, 32]
    assert list(s.mlp_dim) == [1152] * 3 + [2304] * 6 + [1152] * 3
    with pytest.raises(ValueError, match='too small'):
        revit_dims(64)


def formula_params(d: NViTDims, num_tokens=198, num_classes=1000, distilled=True, token_mask=True, patch=16):
    E = d.embed_dim
    total = E * 3 * patch * patch + E + E * (1 + distilled) + num_tokens * E  # patch embed, tokens, pos_embed
    for h, qk, v, m in zip(d.heads, d.qk_dim, d.v_dim, d.mlp_dim):
        qkv = h * (2 * qk + v)
        total += 4 * E  # two LayerNorms
        total += (E + 1) * qkv + h * v * E + E  # q/k/v, proj
        total += (E + 1) * m + m * E + E  # MLP
        total += num_tokens * token_mask
    total += 2 * E + (E + 1) * num_classes * (1 + distilled)  # final norm, heads
    return total


def formula_macs(d: NViTDims, img=224, patch=16, num_classes=1000, distilled=True, layernorm_per_elem=5):
    """Multiply-accumulates as fvcore counts them (matmuls + 5 per LayerNorm element), see docs/nvit.md."""
    E, P = d.embed_dim, (img // patch) ** 2
    N = P + 1 + distilled
    total = P * 3 * patch * patch * E
    for h, qk, v, m in zip(d.heads, d.qk_dim, d.v_dim, d.mlp_dim):
        total += N * E * h * (2 * qk + v) + N * N * h * (qk + v) + N * h * v * E + 2 * N * E * m
    total += layernorm_per_elem * N * E * (2 * d.depth + 1)
    total += E * num_classes * (1 + distilled)
    return total


@pytest.mark.parametrize('name, emb', [('revit_t', 176), ('revit_s', 384)])
def test_revit_params_by_formula(name, emb):
    model = timm.create_model(name)
    assert model.dims == revit_dims(emb)
    assert sum(p.numel() for p in model.parameters()) == formula_params(revit_dims(emb))


def test_reported_revit_numbers():
    """The numbers docs/nvit.md reports next to the paper's (ReViT-S 23M / 4.7G; ReViT-T 5.9M / 1.3G)."""
    assert formula_params(revit_dims(384)) == 23_125_656
    assert round(formula_macs(revit_dims(384)) / 1e9, 2) == 4.71
    assert formula_params(revit_dims(176)) == 5_341_512
    assert round(formula_macs(revit_dims(176)) / 1e9, 2) == 1.14
    # the EMB=192 explanation of the paper's ReViT-T row (no distillation token / head)
    assert round(formula_params(revit_dims(192), num_tokens=197, distilled=False, token_mask=False) / 1e6, 2) == 5.96
    assert round(formula_macs(revit_dims(192), distilled=False) / 1e9, 2) == 1.29


def test_fvcore_matches_formula():
    fvcore = pytest.importorskip('fvcore.nn')
    from fvcore.nn.jit_handles import get_shape

    def sdpa(inputs, outputs):
        q, k, v = (get_shape(i) for i in inputs[:3])
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])

    dims = NViTDims(64, [2, 3], [8, 16], [16, 8], [64, 96])
    model = nvit.NViT(dims, img_size=64, num_classes=10, token_mask=True).eval()
    fca = fvcore.FlopCountAnalysis(model, torch.randn(1, 3, 64, 64))
    fca.set_op_handle('aten::scaled_dot_product_attention', sdpa)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    assert fca.total() == formula_macs(dims, img=64, num_classes=10)


def test_from_dict_missing_mlp_key_is_a_value_error_naming_it():
    """All keys but the MLP width, in either style: a ValueError listing the keys it needs, not a KeyError."""
    ours = UNEVEN.to_dict()
    del ours['mlp_dim']
    with pytest.raises(ValueError, match="'mlp_dim'"):
        NViTDims.from_dict(ours)
    official = UNEVEN.to_dict(official=True)
    del official['MLP']
    with pytest.raises(ValueError, match="'MLP'"):
        NViTDims.from_dict(official)


def test_numpy_and_torch_scalars_become_python_ints():
    import numpy as np
    d = NViTDims(torch.tensor(192), [np.int64(3)], [torch.tensor(64)], (np.int32(32),), [np.int64(768)])
    assert d == NViTDims(192, [3], [64], [32], [768])
    assert type(d.embed_dim) is int
    for name in ('heads', 'qk_dim', 'v_dim', 'mlp_dim'):
        assert [type(v) for v in getattr(d, name)] == [int]
    assert d.to_json() == '{"embed_dim":192,"heads":[3],"qk_dim":[64],"v_dim":[32],"mlp_dim":[768]}'


def test_revit_dims_smallest_embed_dim():
    """round(e * 0.005) is 0 up to e = 100 (0.5 rounds half-even to 0) and 1 from 101: the limit is 101."""
    d = revit_dims(101)
    assert list(d.heads) == [10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10]  # head unit round(0.505) = 1
    assert list(d.qk_dim) == [16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16]  # q/k unit round(101 / 160) = 1
    with pytest.raises(ValueError, match=r'too small .*use embed_dim >= 101\.'):
        revit_dims(100)


# Parameters of ReViT-T's code dims (EMB 176) counted by hand, as in reference nvit.md §1.5 (~5.34M): with the
# distillation token, head_dist and a [198, 1] token scale per block, as the released NViT checkpoints have them
REVIT_T_RELEASED_ARCH_PARAMS = 5_341_512
# the same dims without them: 12 token scales of 198, the dist token (176), head_dist (176 * 1000 + 1000) and one
# position-embedding row (176) fewer
REVIT_T_PLAIN_PARAMS = REVIT_T_RELEASED_ARCH_PARAMS - 12 * 198 - 176 - (176 * 1000 + 1000) - 176


@pytest.mark.parametrize('variant', ['nvit_b', 'nvit_h', 'nvit_s', 'nvit_t'])
def test_nvit_entrypoints_build_the_released_architecture(variant):
    """Without weights (dims=..., or KNOWN_DIMS once filled), nvit_* build what the official checkpoints hold:
    distilled, with token scales, so that those weights load strictly and params / FLOPs are the released model's."""
    model = timm.create_model(variant, dims=revit_dims(176))
    assert sum(p.numel() for p in model.parameters()) == REVIT_T_RELEASED_ARCH_PARAMS
    state = model.state_dict()
    assert all(tuple(state[f'blocks.{i}.attn.token_mask'].shape) == (198, 1) for i in range(12))
    assert tuple(state['dist_token'].shape) == (1, 1, 176) and tuple(state['head_dist.weight'].shape) == (1000, 176)
    assert model._model_args['token_mask'] is True and model._model_args['distilled'] is True  # save_for_hf records
    plain = timm.create_model(variant, dims=revit_dims(176), distilled=False, token_mask=False)
    assert sum(p.numel() for p in plain.parameters()) == REVIT_T_PLAIN_PARAMS == 5_161_784
    assert plain._model_args['token_mask'] is False and plain._model_args['distilled'] is False


def test_known_dims_build_the_released_architecture(monkeypatch):
    """What docs/nvit.md says filling KNOWN_DIMS gives: plain create_model('nvit_b') with the released layout."""
    monkeypatch.setitem(nvit.KNOWN_DIMS, 'nvit_b', revit_dims(176))
    model = timm.create_model('nvit_b')
    assert model.dims == revit_dims(176)
    assert sum(p.numel() for p in model.parameters()) == REVIT_T_RELEASED_ARCH_PARAMS


def _saved(tmp_path, model, name, record=True):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(model.state_dict(), str(path), metadata=nvit.dims_metadata(model) if record else None)
    return path


def test_known_dims_apply_to_a_checkpoint_without_a_dims_record(monkeypatch, tmp_path):
    """Found by an audit: docs/nvit.md says KNOWN_DIMS comes after the checkpoint's record, but a checkpoint without
    a record was refused before KNOWN_DIMS was looked at (the remedy for a release file without 'dim' failed)."""
    source = timm.create_model('nvit_b', dims=revit_dims(176))
    path = _saved(tmp_path, source, 'no_record.safetensors', record=False)
    monkeypatch.setitem(nvit.KNOWN_DIMS, 'nvit_b', revit_dims(176))
    loaded = timm.create_model('nvit_b', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.dims == revit_dims(176)
    assert loaded.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


def test_revit_names_the_block_where_a_checkpoints_dims_record_differs(tmp_path):
    """Found by an audit: a checkpoint of other dims (revit_dims(192), saved with its record) loaded through revit_t
    said "dims=... do not match" although no dims= was given, and named no block. revit_t builds ReViT-T's dims,
    so such a file is still refused, now with the first block that differs and the names that load it."""
    source = timm.create_model('revit_t', dims=revit_dims(192))
    path = _saved(tmp_path, source, 'emb192.safetensors')
    with pytest.raises(ValueError, match=r"differs from revit_t's own dims \(the ReViT rule's\) at embed_dim 176 vs "
                                         r"192 \(revit_t vs checkpoint\)\. Load it with nvit_b/h/s/t") as info:
        timm.create_model('revit_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert 'dims=... given' not in str(info.value)
    loaded = timm.create_model('revit_t', pretrained=True, dims=revit_dims(192),
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert loaded.dims == revit_dims(192)
    assert timm.create_model('nvit_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).dims == \
        revit_dims(192)
    dims = revit_dims(192).to_dict()
    dims['mlp_dim'][2] += 16
    wider = dims['mlp_dim'][2]
    with pytest.raises(ValueError, match=rf"given at block 2: mlp_dim {wider} vs {wider - 16} \(given vs "
                                         r"checkpoint\)\. Leave out dims="):
        timm.create_model('revit_t', pretrained=True, dims=dims, pretrained_cfg_overlay=dict(file=str(path)))
