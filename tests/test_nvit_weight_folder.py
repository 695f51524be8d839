"""The weight file of an NViT ``local-dir:`` folder is the one timm's own folder loader reads.

Reference: timm's ``load_state_dict_from_path`` (what ``local-dir:`` reads for timm's own models) on the same folder,
and the rule it documents: the first of its preferred names, else the first name (sorted) of the first extension in
the order .safetensors, .pth, .pth.tar, .bin. Each file in a folder holds other weights, so a wrong pick shows.
"""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import load_state_dict_from_path

import nvit  # noqa: F401  registers nvit_* / revit_*

DIMS = dict(embed_dim=32, heads=[2, 1, 3], qk_dim=[8, 16, 8], v_dim=[16, 8, 8], mlp_dim=[48, 32, 64])
SMALL = dict(dims=DIMS, img_size=64, num_classes=10, token_mask=True)

PREFERRED = ['model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth',
             'open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors', 'open_clip_pytorch_model.bin',
             'open_clip_pytorch_model.pth']
EXTENSIONS = ['.safetensors', '.pth', '.pth.tar', '.bin']


def _folder(tmp_path, names):
    """A save_for_hf folder (config.json) whose weight files are ``names``, each with weights of its own seed."""
    folder = tmp_path / 'hf'
    weights = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = timm.create_model('nvit_b', **SMALL).eval()
        if not weights:
            timm.models.save_for_hf(model, str(folder), safe_serialization=True)
            (folder / 'model.safetensors').unlink()
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        if name.endswith('.safetensors'):
            save_file(sd, str(folder / name))
        else:
            torch.save(sd, folder / name)
        weights[name] = sd
    assert json.loads((folder / 'config.json').read_text())['architecture'] == 'nvit_b'
    return folder, weights


# (files in the folder, the one the documented rule picks)
CASES = [([name], name) for name in PREFERRED] + [
    (['checkpoint.pth'], 'checkpoint.pth'),
    (['weights.pth.tar'], 'weights.pth.tar'),
    (['w.bin'], 'w.bin'),
    (['nvit-small.safetensors'], 'nvit-small.safetensors'),
    (['model.pth', 'pytorch_model.pth'], 'pytorch_model.pth'),  # preferred names in timm's order
    (['model.pth', 'a.safetensors'], 'model.pth'),  # a preferred name before any extension
    (['open_clip_pytorch_model.pth', 'a.safetensors'], 'open_clip_pytorch_model.pth'),
    (['b.pth', 'a.pth', 'c.pth'], 'a.pth'),  # the first name, sorted
    (['B.pth', 'a.pth'], 'B.pth'),  # sorted by code point, as timm sorts
    (['a.pth', 'z.safetensors'], 'z.safetensors'),  # extension order
    (['a.bin', 'z.pth.tar'], 'z.pth.tar'),
    (['a.bin', 'z.pth'], 'z.pth'),
]


@pytest.mark.parametrize('names, picked', CASES, ids=['+'.join(c[0]) for c in CASES])
@torch.no_grad()
def test_local_dir_reads_the_file_timm_reads(tmp_path, names, picked):
    """Found by an audit: only model.safetensors, pytorch_model.bin and model.pth were looked for (a folder with
    pytorch_model.pth or checkpoint.pth, which timm's own models load, was "No NViT weights")."""
    folder, weights = _folder(tmp_path, names)
    timms = load_state_dict_from_path(folder)
    assert all(torch.equal(timms[k], weights[picked][k]) for k in weights[picked])  # the reference obeys the rule
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    got = model.state_dict()
    assert sorted(got) == sorted(timms)
    assert all(torch.equal(got[k], timms[k]) for k in timms)
    reference = timm.create_model('nvit_b', **SMALL).eval()
    reference.load_state_dict(timms, strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), reference(x))


def test_folder_without_weights_says_what_was_looked_for(tmp_path):
    folder, _ = _folder(tmp_path, ['model.pth'])
    (folder / 'model.pth').rename(folder / 'model.pt')  # an extension timm does not look for
    (folder / 'notes.txt').write_text('no weights here')
    with pytest.raises(FileNotFoundError, match=f"No NViT weights in folder '{folder}'") as info:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    message = str(info.value)
    assert all(name in message for name in PREFERRED + EXTENSIONS), message
    with pytest.raises(RuntimeError, match='No suitable checkpoints'):  # timm finds nothing there either
        load_state_dict_from_path(folder)


def test_a_folder_picked_by_name_is_named(tmp_path):
    """timm's rule picks by name, also a sub-folder named a.pth (timm then fails to read it): say which."""
    folder, _ = _folder(tmp_path, ['b.pth'])
    (folder / 'a.pth').mkdir()
    with pytest.raises(FileNotFoundError, match=r"picks 'a\.pth', which is not a file"):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
