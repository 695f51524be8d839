"""Fetch timm's own ``tests/test_models.py`` for the installed timm version, so pytest runs it on our models.

The file comes from the timm **sdist** (the wheel has no tests) via
``pip download --no-deps --no-binary :all: timm==<installed version>`` into ``.cache/timm-sdist/`` and is written to
``tests/upstream/test_timm_models.py`` (git-ignored), where the same ``pytest`` run collects it; ``conftest.py`` next
to it restricts it to the ``shvit_*`` models. A no-op when the file for this version is already there. Fails loudly
(exit status 1 and a message) when the file cannot be obtained; nothing is skipped silently.

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
HEADER = '# fetched by tests/upstream/fetch_timm_tests.py from the timm-{} sdist; do not edit\n'


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
