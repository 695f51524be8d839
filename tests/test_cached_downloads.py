"""A damaged file in timm's download cache for URL-hosted weights (the ``shvit_sX.in1k_official`` GitHub release, the
``nvit_*.in1k`` Dropbox files) is reported as corrupt or truncated, naming the cached file and saying to delete it,
never with torch's advice for an unsafe pickle (load it with ``weights_only=False``, "if you trust this class"); a
complete file that pickles a global weights-only loading does not allow is still reported as unsafe.

Found: a random file in the cache, ``$TORCH_HOME/hub/checkpoints/NViT_T.pth``, was "Cannot read checkpoint ...:
UnpicklingError: Weights only load failed ... Re-running `torch.load` with `weights_only` set to `False` will likely
succeed"; for ``shvit_s1.in1k_official`` a legacy file cut inside a global's name was torch's "Unsupported global"
text, a zip archive with a member failing its CRC loaded without error, and a complete file that pickles an unsafe
global was called corrupt. The files are put in the cache, so nothing is downloaded.

The same holds for a ``torch.save`` weight file of a Hub repo in the Hub cache (``pytorch_model.bin``, or the cfg's
``hf_hub_filename``), whose message also names the blob the cache entry links to. Found: a ``shvit_s1`` legacy state
dict cut to 782 bytes as ``pytorch_model.bin`` in the Hub cache was a plain RuntimeError advising to retry with
``weights_only=False``, and one with a member failing its CRC loaded; through ``nvit_*`` the message named no blob.
A damaged ``model.safetensors`` there gets the same message.
"""
import ast
import os
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import pytest
import timm
import torch

import nvit
import shvit
from files import damage_largest_member  # tests/files.py
from vitzoo.hub import CorruptWeightsError, WeightsError, load_pretrained_model

# an official-style NViT record (reference nvit.md: 'dim' = {EMB, head, QK, V, MLP}) for a small 2-block model
NVIT_DIM = {'EMB': 48, 'head': [2, 3], 'QK': [8, 16], 'V': [16, 8], 'MLP': [64, 32]}
# registered tag, its URL's file name, the package's error for a damaged file
MODELS = {
    'shvit': ('shvit_s1.in1k_official', 'shvit_s1.pth', shvit.CorruptCheckpointError),
    'nvit': ('nvit_t.in1k', 'NViT_T.pth', nvit.CorruptCheckpointError),
}
# torch's words for a file its weights-only unpickler refuses, and advice for trusted files only
UNSAFE_ADVICE = ('weights_only` set to `False`', 'weights_only=False', 'trust', 'allowlisted', 'pickles')


class Pickled:
    """An object that weights_only=True refuses to unpickle (its global is not allowlisted)."""

    def __reduce__(self):
        return (Pickled, ())


def _random_like(state):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture(scope='module')
def checkpoints():
    """Each package's checkpoint as its release has it: a training checkpoint with the weights under 'model' (and
    NViT's 'dim' record)."""
    shvit_sd = _random_like(timm.create_model('shvit_s1').state_dict())
    nvit_sd = _random_like(timm.create_model('nvit_t', dims=NVIT_DIM).state_dict())
    return {'shvit': {'model': shvit_sd, 'epoch': 299}, 'nvit': {'model': nvit_sd, 'dim': NVIT_DIM, 'epoch': 299}}


def _write(path, checkpoint, case):
    """Write ``checkpoint`` to ``path`` damaged as ``case`` says."""
    legacy = case.startswith('legacy')
    torch.save(dict(checkpoint, extra=Pickled()) if case == 'unsafe' else checkpoint, path,
               _use_new_zipfile_serialization=not legacy, pickle_protocol=4 if case == 'protocol4' else 2)
    data = path.read_bytes()
    if case == 'legacy_cut':  # inside the first storage type's name ("torch\nFloatStor"): an "Unsupported global"
        path.write_bytes(data[:data.index(b'Storage') + 4])
    elif case == 'zip_cut':
        path.write_bytes(data[:len(data) // 2])
    elif case == 'zip_crc':
        damage_largest_member(path)
    elif case == 'garbage':
        path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1),
                                       dtype=torch.uint8).numpy().tobytes())
    elif case == 'html':  # what a share link answers instead of the file, e.g. a login page
        path.write_bytes(b'<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n' * 20)


def _write_safetensors(path, checkpoint, case):
    """Write ``checkpoint``'s weights to ``path`` as a safetensors file, damaged as ``case`` says."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in checkpoint['model'].items()}, str(path))
    data = path.read_bytes()
    if case == 'cut':
        path.write_bytes(data[:len(data) // 2])
    elif case == 'header_cut':  # inside the JSON header
        path.write_bytes(data[:100])
    elif case == 'empty':
        path.write_bytes(b'')
    elif case in ('garbage', 'html'):
        _write(path, checkpoint, case)


def _timm(tag, **kwargs):
    return timm.create_model(tag, pretrained=True, **kwargs)


def _not_called(*args, **kwargs):
    raise AssertionError('timm.create_model was called: the file was not checked first')


READERS = {  # package, how it is loaded, the error a damaged file must raise (None: the package's)
    'shvit': ('shvit', _timm, None),
    'nvit': ('nvit', _timm, None),
    'vitzoo-shvit': ('shvit', load_pretrained_model, CorruptWeightsError),
    'vitzoo-nvit': ('nvit', load_pretrained_model, CorruptWeightsError),
}
DAMAGED = ['garbage', 'html', 'legacy_cut', 'zip_cut', 'zip_crc']


@pytest.fixture(params=['TORCH_HOME', 'cache_dir'])
def cache(request, tmp_path, monkeypatch):
    """The folder timm downloads URL weights into, and the kwargs that make it so: torch's hub cache under a temp
    $TORCH_HOME, or ``cache_dir=``."""
    if request.param == 'TORCH_HOME':
        monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
        folder = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
        kwargs = {}
    else:
        folder = tmp_path / 'cache'
        kwargs = {'cache_dir': str(folder)}
    folder.mkdir(parents=True)
    return folder, kwargs


def test_the_tags_download_under_these_file_names():
    """The file names the tests put in the cache are those of the registered URLs (the path's last part)."""
    for tag, file_name, _ in MODELS.values():
        assert os.path.basename(urlparse(timm.models.get_pretrained_cfg(tag).url).path) == file_name


@pytest.mark.parametrize('case', DAMAGED)
@pytest.mark.parametrize('reader', list(READERS))
def test_a_damaged_cached_download_is_corrupt_and_to_be_deleted(checkpoints, cache, reader, case, monkeypatch):
    package, load, error = READERS[reader]
    tag, file_name, package_error = MODELS[package]
    folder, kwargs = cache
    path = folder / file_name
    _write(path, checkpoints[package], case)
    data = path.read_bytes()
    if error is CorruptWeightsError:  # load_pretrained_model checks the weight file before timm reads it
        monkeypatch.setattr(timm, 'create_model', _not_called)
    with pytest.raises(Exception) as info:
        load(tag, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, error or package_error), f'{type(info.value).__name__}: {message}'
    assert 'corrupt or truncated' in message and f'delete {path}' in message, message
    assert 'pretrained_cfg_overlay=dict(file=' in message, message
    assert not [words for words in UNSAFE_ADVICE if words in message], message
    assert path.read_bytes() == data and os.listdir(folder) == [file_name]  # reported, left alone, nothing fetched


@pytest.mark.parametrize('reader', list(READERS))
def test_a_complete_cached_download_with_an_unsafe_global_is_still_unsafe(checkpoints, cache, reader):
    package, load, error = READERS[reader]
    tag, file_name, package_error = MODELS[package]
    folder, kwargs = cache
    _write(folder / file_name, checkpoints[package], 'unsafe')
    with pytest.raises(RuntimeError) as info:
        load(tag, **kwargs)
    message = str(info.value)
    assert not isinstance(info.value, (package_error, error or package_error)), message
    assert error is None or isinstance(info.value, WeightsError), message
    assert 'pickles' in message and 'corrupt' not in message and 'delete' not in message, message
    assert str(folder / file_name) in message, message  # the file to re-save, if trusted: not the URL
    assert f'{Pickled.__module__}.Pickled' in message or reader.startswith('vitzoo'), message


@pytest.mark.parametrize('case', ['zip', 'legacy'])
@pytest.mark.parametrize('reader', list(READERS))
def test_a_complete_cached_download_loads(checkpoints, cache, reader, case):
    """The checks pass a complete file of either format: the model gets the file's tensors."""
    package, load, _ = READERS[reader]
    tag, file_name, _ = MODELS[package]
    folder, kwargs = cache
    _write(folder / file_name, checkpoints[package], case)
    model = load(tag, **kwargs)
    saved = checkpoints[package]['model']
    for key in ('head.l.weight', 'stages.2.blocks.0.mixer.m.qkv.c.weight') if package == 'shvit' else (
            'pos_embed', 'blocks.1.mlp.fc1.weight', 'head_dist.weight'):
        assert torch.equal(model.state_dict()[key], saved[key]), key


@pytest.mark.parametrize('case', ['garbage', 'zip_crc'])
@pytest.mark.parametrize('package', ['shvit', 'nvit'])
def test_a_download_that_arrives_damaged_is_corrupt(checkpoints, tmp_path, package, case):
    """A file timm has just downloaded (here from a file:// URL, into an empty cache) is checked as a cached one."""
    tag, file_name, error = MODELS[package]
    served = tmp_path / 'server' / file_name
    served.parent.mkdir()
    _write(served, checkpoints[package], case)
    cache = tmp_path / 'cache'
    with pytest.raises(error) as info:
        _timm(tag, cache_dir=str(cache), pretrained_cfg_overlay=dict(url=f'file://{served}'))
    message = str(info.value)
    assert f'delete {cache / file_name}' in message and 'corrupt or truncated' in message, message
    assert not [words for words in UNSAFE_ADVICE if words in message], message


@pytest.mark.parametrize('protocol', [1, 2, 3, 4, 5])  # protocol 0: torch.load cannot read it
@pytest.mark.parametrize('module', ['shvit.download_cache', 'nvit.download_cache'])
def test_complete_files_of_every_pickle_protocol_pass_the_check(tmp_path, module, protocol):
    """torch.save files of either format, the legacy one in any pickle protocol, are not called damaged (the
    reference: torch.load reads each back)."""
    torch_file_damage = __import__(module, fromlist=['torch_file_damage']).torch_file_damage
    state = {'w': torch.arange(6.0), 'i': torch.arange(3)}
    for legacy in (True, False):
        path = tmp_path / f'{protocol}{legacy}.pth'
        torch.save(state, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
        assert torch.equal(torch.load(path, weights_only=False)['w'], state['w'])
        assert torch_file_damage(path) is None, (protocol, legacy)


def test_the_two_copies_of_the_download_check_are_the_same_code():
    """The model packages may not import each other, so each has its copy: the same code (quotes aside)."""
    root = Path(__file__).resolve().parents[1]
    copies = ('shvit/download_cache.py', 'nvit/download_cache.py')
    trees = {p: ast.dump(ast.parse((root / p).read_text())) for p in copies}
    assert len(set(trees.values())) == 1, list(trees)


# --- Hub weights in the Hub cache ---------------------------------------------------------------------------------

HUB_REPO = 'org/damaged'
COMMIT = '0123456789abcdef0123456789abcdef01234567'


def _hub_put(cache, checkpoint, case, filename):
    """Put ``checkpoint``, damaged as ``case`` says, in the Hub cache folder ``cache`` as Hub repo HUB_REPO's
    ``filename`` on its main branch, laid out as the Hub client does: a blob named by the content's sha256, linked from
    the commit's snapshot folder. Returns the snapshot entry and the blob. A ``*flipped`` case changes a byte of the
    last tensor's data after naming the blob, as a disk or copy error would."""
    import hashlib
    repo = cache / ('models--' + HUB_REPO.replace('/', '--'))
    staged = cache.parent / 'staged.pth'
    (_write_safetensors if filename.endswith('.safetensors') else _write)(staged, checkpoint, case)
    data = staged.read_bytes()
    staged.unlink()
    blob = repo / 'blobs' / hashlib.sha256(data).hexdigest()
    if case.endswith('flipped'):
        data = data[:-4] + bytes([data[-4] ^ 0x10]) + data[-3:]
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    entry = repo / 'snapshots' / COMMIT / filename
    entry.parent.mkdir(parents=True)
    entry.symlink_to(os.path.relpath(blob, entry.parent))
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)
    return entry, blob


def _hub_load(package, cache, filename):
    """Load ``package``'s small model with Hub weights from HUB_REPO in ``cache``, offline (no request is made)."""
    overlay = dict(hf_hub_id=HUB_REPO)
    if filename != 'pytorch_model.bin':
        overlay['hf_hub_filename'] = filename
    kwargs = dict(dims=NVIT_DIM) if package == 'nvit' else {}
    tag = 'shvit_s1' if package == 'shvit' else 'nvit_t'
    return timm.create_model(tag, pretrained=True, cache_dir=str(cache), pretrained_cfg_overlay=overlay, **kwargs)


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)


HUB_FILES = ['pytorch_model.bin', 'weights.pth']  # timm's default Hub file, and one a cfg names (hf_hub_filename)


@pytest.mark.parametrize('filename', HUB_FILES)
@pytest.mark.parametrize('case', DAMAGED)
@pytest.mark.parametrize('package', list(MODELS))
def test_a_damaged_hub_file_in_the_hub_cache_is_corrupt_and_to_be_deleted(checkpoints, tmp_path, offline, package,
                                                                          case, filename):
    entry, blob = _hub_put(tmp_path / 'hub', checkpoints[package], case, filename)
    data = blob.read_bytes()
    with pytest.raises(MODELS[package][2]) as info:
        _hub_load(package, tmp_path / 'hub', filename)
    message = str(info.value)
    assert f'{filename} of Hub repo {HUB_REPO} in the Hub cache, {entry}, is corrupt or truncated' in message, message
    assert f'delete {entry} and {blob}, the blob it links to,' in message, message
    assert f'hf download {HUB_REPO} {filename} --force-download' in message, message
    assert 'pretrained_cfg_overlay=dict(file=' in message, message
    assert not [words for words in UNSAFE_ADVICE if words in message], message
    assert blob.read_bytes() == data and entry.is_symlink()  # reported, left alone


@pytest.mark.parametrize('case', ['cut', 'header_cut', 'empty', 'garbage', 'html'])
@pytest.mark.parametrize('package', list(MODELS))
def test_a_damaged_safetensors_hub_file_names_the_entry_and_its_blob(checkpoints, tmp_path, offline, package, case):
    """A damaged ``model.safetensors`` in the Hub cache (the file timm reads first) gets the same message as a
    damaged torch.save file there. Before 2026-11-25, through shvit_* it was the reader's words without the file, and
    through nvit_* without the blob."""
    entry, blob = _hub_put(tmp_path / 'hub', checkpoints[package], case, 'model.safetensors')
    with pytest.raises(MODELS[package][2]) as info:
        _hub_load(package, tmp_path / 'hub', 'model.safetensors')
    message = str(info.value)
    assert f'model.safetensors of Hub repo {HUB_REPO} in the Hub cache, {entry}, is corrupt or truncated: it is no ' \
        'complete safetensors file (SafetensorError' in message, message
    assert f'delete {entry} and {blob}, the blob it links to,' in message, message
    assert f'hf download {HUB_REPO} model.safetensors --force-download' in message, message


@pytest.mark.parametrize('filename, case', [('model.safetensors', 'flipped'), ('pytorch_model.bin', 'legacy_flipped')])
@pytest.mark.parametrize('package', list(MODELS))
def test_a_hub_file_whose_bytes_changed_after_the_download_is_corrupt(checkpoints, tmp_path, offline, package, filename,
                                                                      case):
    """A Hub file in the Hub cache with a byte of its tensor data changed (neither safetensors nor a legacy
    torch.save file has a checksum, so it reads without error, as checked here) no longer hashes to the sha256 its blob
    is named by: the package's CorruptCheckpointError names both hashes, the entry and the blob. Before 2026-11-25 it
    loaded the changed weights without a word."""
    import hashlib
    entry, blob = _hub_put(tmp_path / 'hub', checkpoints[package], case, filename)
    if filename.endswith('.safetensors'):
        from safetensors.torch import load_file
        read = load_file(str(blob))
    else:
        read = torch.load(blob, weights_only=True)['model']
    saved = checkpoints[package]['model']
    assert read.keys() == saved.keys() and sum(not torch.equal(read[k], v) for k, v in saved.items()) == 1
    with pytest.raises(MODELS[package][2]) as info:
        _hub_load(package, tmp_path / 'hub', filename)
    message = str(info.value)
    actual = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert f'{filename} of Hub repo {HUB_REPO} in the Hub cache, {entry}, is corrupt or truncated: its content ' \
        f'hashes to sha256 {actual}, not to {blob.name}, the sha256 the Hub gave for it' in message, message
    assert f'delete {entry} and {blob}, the blob it links to,' in message, message


@pytest.mark.parametrize('filename', ['model.safetensors', 'weights.safetensors'])
@pytest.mark.parametrize('package', list(MODELS))
def test_a_complete_safetensors_hub_file_loads(checkpoints, tmp_path, offline, package, filename):
    _hub_put(tmp_path / 'hub', checkpoints[package], 'complete', filename)
    model = _hub_load(package, tmp_path / 'hub', filename)
    saved = checkpoints[package]['model']
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize('package', list(MODELS))
def test_a_complete_hub_file_with_an_unsafe_global_is_still_unsafe(checkpoints, tmp_path, offline, package):
    _hub_put(tmp_path / 'hub', checkpoints[package], 'unsafe', 'pytorch_model.bin')
    with pytest.raises(RuntimeError) as info:
        _hub_load(package, tmp_path / 'hub', 'pytorch_model.bin')
    message = str(info.value)
    assert not isinstance(info.value, MODELS[package][2]), message
    assert 'pickles' in message and 'corrupt' not in message and 'delete' not in message, message


@pytest.mark.parametrize('filename', HUB_FILES)
@pytest.mark.parametrize('case', ['zip', 'legacy'])
@pytest.mark.parametrize('package', list(MODELS))
def test_a_complete_hub_file_loads(checkpoints, tmp_path, offline, package, case, filename):
    """The checks pass a complete Hub file of either format: the model gets the file's tensors."""
    _hub_put(tmp_path / 'hub', checkpoints[package], case, filename)
    model = _hub_load(package, tmp_path / 'hub', filename)
    saved = checkpoints[package]['model']
    for key in ('head.l.weight', 'stages.2.blocks.0.mixer.m.qkv.c.weight') if package == 'shvit' else (
            'pos_embed', 'blocks.1.mlp.fc1.weight', 'head_dist.weight'):
        assert torch.equal(model.state_dict()[key], saved[key]), key


@pytest.mark.parametrize('where', ['url', 'hub'])
@pytest.mark.parametrize('package', list(MODELS))
def test_a_complete_cached_file_in_pickle_protocol_4_is_named_so(checkpoints, tmp_path, offline, package, where):
    """A complete file saved with pickle_protocol=4, which torch.load(weights_only=True) does not read, in timm's
    download cache or the Hub cache: the package's PickleProtocolError names the cached file and its protocol, not
    corrupt, not unsafe (before 2026-11-25: through shvit_* a CorruptCheckpointError, "not a pickle that torch.save
    writes"; through nvit_* torch's whole message, called truncated or corrupt)."""
    tag, file_name, package_error = MODELS[package]
    if where == 'url':
        path = tmp_path / 'cache' / file_name
        path.parent.mkdir()
        _write(path, checkpoints[package], 'protocol4')
        load = partial(_timm, tag, cache_dir=str(path.parent))
    else:
        path, _ = _hub_put(tmp_path / 'hub', checkpoints[package], 'protocol4', 'pytorch_model.bin')
        load = partial(_hub_load, package, tmp_path / 'hub', 'pytorch_model.bin')
    with pytest.raises(RuntimeError) as info:
        load()
    message = str(info.value)
    assert type(info.value).__name__ == 'PickleProtocolError' and type(info.value).__module__.startswith(package)
    assert f'{path} is a torch.save file saved in pickle protocol 4' in message, message
    assert 'corrupt' not in message and 'allowlisted' not in message, message


def test_an_official_shvit_checkpoint_with_its_args_loads_from_a_url(checkpoints, tmp_path):
    """Found by an audit: the official training script saves 'args' (an argparse.Namespace). From a local file timm's
    reader allows it, but from a URL timm's weights-only download refused it and advised unsafe loading. The local
    file's load is the reference."""
    import argparse

    served = tmp_path / 'server' / 'shvit_s1.pth'
    served.parent.mkdir()
    torch.save({**checkpoints['shvit'], 'args': argparse.Namespace(model='shvit_s1', lr=1e-3)}, served)
    from_url = _timm('shvit_s1.in1k_official', cache_dir=str(tmp_path / 'cache'),
                     pretrained_cfg_overlay=dict(url=f'file://{served}'))
    from_file = _timm('shvit_s1.in1k_official', pretrained_cfg_overlay=dict(file=str(served)))
    for key, value in from_file.state_dict().items():
        assert torch.equal(from_url.state_dict()[key], value), key
    # torch's allow-list is process-global: a caller's own allowance stays (found in review: it was removed)
    with torch.serialization.safe_globals([argparse.Namespace]):
        _timm('shvit_s1.in1k_official', cache_dir=str(tmp_path / 'cache'),
              pretrained_cfg_overlay=dict(url=f'file://{served}'))
        assert argparse.Namespace in torch.serialization.get_safe_globals()
