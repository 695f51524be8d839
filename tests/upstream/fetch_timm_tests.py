"""Fetch timm's own ``tests/test_models.py`` for the installed timm version, so pytest runs it on our models.

The file comes from the timm **sdist** (the wheel has no tests) via
``pip download --no-deps --no-binary :all: timm==<installed version>`` into ``.cache/timm-sdist/`` and is written to
``tests/upstream/test_timm_models.py`` (git-ignored), where the same ``pytest`` run collects it; ``conftest.py`` next
to it restricts it to our models. Two lines are added (``PATCH``): ``nvit_*`` / ``revit_*`` join timm's list of
non-standard (token-output) model families, as timm lists its own ``vit_*`` and ``deit_*``, and the ``nvit`` module
joins the modules whose ``forward_intermediates`` is tested. A no-op when the file for this version is already there.
Fails loudly (exit status 1 and a message) when the file cannot be obtained; nothing is skipped silently.

Usage: ``.venv/bin/python tests/upstream/fetch_timm_tests.py [--force]`` (``make upstream-tests`` runs it).
"""
import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / '.cache' / 'timm-sdist'
TARGET = HERE / 'test_timm_models.py'
HEADER = ('# fetched by tests/upstream/fetch_timm_tests.py from the timm-{} sdist, with NViT/ReViT added to two '
          'model lists; do not edit\n')
# Lines inserted before one line of timm's file (after both lists are defined), so that our ViT family is tested the
# way timm tests its own:
# * timm lists its token-output ViT families (vit_*, deit_*, ...) in NON_STD_FILTERS: their configs are checked by
#   test_model_default_cfgs_non_std, not by the test for spatial (NCHW) feature maps;
# * FEAT_INTER_FILTERS names the model modules whose forward_intermediates / features_only(getter) are tested
#   (timm's own 'shvit' is already there; our NViT module is 'nvit').
ANCHOR = 'NUM_NON_STD = len(NON_STD_FILTERS)'
PATCH = ("NON_STD_FILTERS += ['nvit_*', 'revit_*']  # added by fetch_timm_tests.py: vitzoo's ViT family\n"
         "FEAT_INTER_FILTERS += ['nvit']  # added by fetch_timm_tests.py: vitzoo's NViT module\n")


def _sdist(ver: str) -> Path:
    """The cached sdist archive, downloaded with pip on first use."""
    found = sorted(CACHE.glob(f'timm-{ver}.tar.gz'))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f'fetch_timm_tests: downloading the timm=={ver} sdist into {CACHE} ...', flush=True)
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '--progress-bar', 'on',
           '-d', str(CACHE), f'timm=={ver}']
    result = subprocess.run(cmd)
    found = sorted(CACHE.glob(f'timm-{ver}.tar.gz'))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f'`{" ".join(cmd)}` failed (exit {result.returncode}). It needs network access to PyPI once; '
            f'afterwards the archive is cached in {CACHE}. Alternatively place timm-{ver}.tar.gz there by hand.')
    return found[0]


def _add_our_models(source: str, member: str) -> str:
    """Insert ``PATCH`` before the ``ANCHOR`` line (which must occur exactly once)."""
    if source.count('\n' + ANCHOR) != 1:
        raise RuntimeError(f'{member} no longer has exactly one line starting `{ANCHOR}`, before which NViT/ReViT are '
                           'added to two model lists; update ANCHOR in this script for this timm version.')
    return source.replace('\n' + ANCHOR, '\n' + PATCH + ANCHOR)


def fetch(force: bool = False) -> Path:
    try:
        ver = version('timm')
    except PackageNotFoundError as e:
        raise RuntimeError('timm is not installed in this environment; run `make setup` first.') from e
    header = HEADER.format(ver)
    if not force and TARGET.exists() and TARGET.read_text().startswith(header):
        print(f'fetch_timm_tests: {TARGET.relative_to(REPO)} is up to date (timm {ver}).')
        return TARGET
    archive = _sdist(ver)
    member = f'timm-{ver}/tests/test_models.py'
    try:
        with tarfile.open(archive) as tar:
            source = tar.extractfile(member).read().decode()
    except (KeyError, AttributeError, tarfile.TarError, OSError) as e:
        raise RuntimeError(f'{archive} has no readable {member} ({e}); delete the archive and run again.') from e
    source = _add_our_models(source, member)
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
        f.write(header + source)
    os.chmod(tmp, 0o644)
    os.replace(tmp, TARGET)
    print(f'fetch_timm_tests: wrote {TARGET.relative_to(REPO)} from {archive.name}.')
    return TARGET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--force', action='store_true', help='extract again even if the file is up to date')
    args = parser.parse_args()
    try:
        fetch(force=args.force)
    except RuntimeError as e:
        print(f'fetch_timm_tests: ERROR: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
