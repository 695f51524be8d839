"""``vitzoo push``: publish a converted folder to the Hugging Face Hub.

The folder is verified first (:func:`vitzoo.convert.verify_folder`: files, metadata, config, and that timm loads
it and reproduces the raw weights); a folder that fails is refused before any request is made. Then the repo is
created (``create_repo``, private on request; an existing repo is reused, except a public one with ``--private``,
which is refused) and the three Hub files (``model.safetensors``, ``config.json``, ``README.md``) are uploaded in one
``upload_folder`` commit; other files in the folder are not uploaded. The card's usage line
(``timm.create_model('hf-hub:...')``) is made to name the repo it is pushed to. An existing repo whose
``config.json`` names another architecture (or none) is refused unless ``--force``: its weights would be replaced by
another model's; a new version of the same architecture is pushed without it.

The three files are copied into a private temporary folder first, and that copy is both verified and uploaded: a
file changed in the folder while the command runs (a convert ``--force`` over it, an editor saving the card) cannot
make the upload differ from what was verified.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

from .cli import named_output
from .convert import HUB_FILES, UsageError, VerificationError, verify_folder
from .manifest import _REPO_RE
from .messages import help_description

__all__ = ["push_folder", "register", "run"]

NAME = "push"


def push_folder(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    force: bool = False,
) -> str:
    """Verify ``folder`` and upload its Hub files to ``repo_id``.

    Args:
        folder: a folder written by ``vitzoo convert``.
        repo_id: ``org/name`` on the Hub.
        private: create the repo as private; an existing public repo is then refused (nothing is uploaded).
        revision: branch to commit to (created if missing); default ``main``.
        token: Hub token (default: the saved login or ``HF_TOKEN``).
        commit_message: default ``"Upload <model> converted by vitzoo"``.
        force: replace the weights of an existing repo whose ``config.json`` names another architecture than the
            folder's (without it, such a repo is refused and nothing is uploaded).

    Returns:
        The URL of the commit.

    Raises:
        VerificationError: the folder fails verification (nothing is uploaded).
        UsageError: ``repo_id`` is not a Hub repo id ``org/name``, or ``token`` is empty (a ``ValueError``).
        ValueError: ``private``, and the repo exists and is public; or, without ``force``, the repo's
            ``config.json`` names another architecture (nothing is uploaded).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    if not (isinstance(repo_id, str) and _REPO_RE.fullmatch(repo_id)):
        raise UsageError(f"--repo must be a Hub repo id 'org/name' (letters, digits, '_', '-', '.'; neither part "
                         f"starting or ending with '-' or '.', no '--' or '..'), got {repo_id!r}.")
    if token is not None and not (isinstance(token, str) and token.strip()):  # found by an audit: sent as "Bearer "
        raise UsageError("--token is empty (an unset shell variable?); leave it out to use the saved login "
                         "(`hf auth login`) or HF_TOKEN.")
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix=".vitzoo-push-") as snapshot:
        # what is uploaded is exactly what is verified: a copy, not the folder (which may change meanwhile)
        try:
            shown = repo_id if not revision or revision == "main" else f"{repo_id}@{revision}"  # timm's spelling
            report = verify_folder(_name_repo_in_card(_snapshot(folder, Path(snapshot)), shown))
        except VerificationError as e:  # named as the user's folder, not the copy
            raise VerificationError(str(e).replace(snapshot, str(folder))) from e
        api = HfApi(token=token)
        try:
            existing = api.repo_info(repo_id)
        except RepositoryNotFoundError:
            existing = None
        if existing is not None and private and not existing.private:  # found by an audit: silently public
            raise ValueError(f"Hub repo '{repo_id}' exists and is public; --private does not make it private, and "
                             f"nothing was uploaded. Make it private in its settings on the Hub first, or push to "
                             f"a new repo.")
        if existing is not None and not force:  # found by an audit: another model's weights replaced unasked
            _refuse_another_architecture(api, repo_id, revision, report.model, existing)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=snapshot,
            allow_patterns=list(HUB_FILES),
            revision=revision,
            commit_message=commit_message or f"Upload {report.model} converted by vitzoo",
        )
    return str(info.commit_url)


def _refuse_another_architecture(api, repo_id: str, revision: Optional[str], model: str, existing) -> None:
    """Raise ``ValueError`` when ``repo_id``, whose ``main`` has a ``config.json``, has one (at ``revision`` if that
    branch exists, else ``main``) that does not name ``model`` as its ``architecture``."""
    import json

    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RevisionNotFoundError)

    if "config.json" not in {getattr(s, "rfilename", None) for s in (getattr(existing, "siblings", None) or ())}:
        return  # main has none: no model whose weights a push would replace
    with tempfile.TemporaryDirectory(prefix=".vitzoo-push-config-") as cache:
        for rev in dict.fromkeys([revision or "main", "main"]):  # a branch to be created starts from main
            try:
                path = api.hf_hub_download(repo_id, "config.json", revision=rev, cache_dir=cache)
                break
            except LocalEntryNotFoundError as e:  # the download failed (network, 403, 429, 5xx): the check cannot
                # be made, which is no "config.json is not there" (found by a review: the push went on unchecked)
                cause = e.__cause__ or e.__context__
                if isinstance(cause, HfHubHTTPError):
                    raise cause from None  # reported as one line with its status and what to do
                failure = cause or e
                reason = (str(failure).splitlines() or ["no message"])[0]
                raise ValueError(f"could not read the config.json of Hub repo '{repo_id}' to check its architecture "
                                 f"({type(failure).__name__}: {reason}), so nothing was uploaded. Check the "
                                 f"connection and run the command again, or pass --force to push without the "
                                 f"check.") from e
            except (EntryNotFoundError, RevisionNotFoundError):  # not on that branch, or no such branch yet
                continue
        else:
            return
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            config = None
    name = config.get("architecture") if isinstance(config, dict) else None
    if name == model:
        return
    says = f"names architecture {name!r}" if isinstance(name, str) else "names no timm architecture"
    raise ValueError(f"Hub repo '{repo_id}' exists and its config.json {says}, not {model!r}; pushing would replace "
                     f"its weights with another model's, so nothing was uploaded. Pass --force to replace them, or "
                     f"push to a new repo.")


# the card's usage example, as weights/card_template.md writes it: timm.create_model('hf-hub:ORG/NAME', ...)
_USAGE = re.compile(r"""(create_model\(\s*['"]hf-hub:)[^'"\s]+(['"])""")


def _name_repo_in_card(folder: Path, repo_id: str) -> Path:
    """Make the card's usage line load ``repo_id`` (``org/name``, or ``org/name@branch``): a folder converted
    without ``--repo`` names ``ORG/NAME`` or the release's repo (found by an audit: a card pushed to ``me/shvit``
    told readers to load ``timm/shvit_s1.in1k``)."""
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="surrogateescape")
        named = _USAGE.sub(lambda m: f"{m.group(1)}{repo_id}{m.group(2)}", text, count=1)  # the template's line
        if named != text:
            card.write_text(named, encoding="utf-8", errors="surrogateescape")
    return folder


def _snapshot(folder: Path, into: Path) -> Path:
    """Copy the Hub files of ``folder`` that exist into ``into`` (:func:`verify_folder` then names a missing one);
    returns ``into``."""
    if not folder.is_dir():
        verify_folder(folder)  # its own message: the folder is missing or a file
    for name in HUB_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, into / name)
    return into


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``push`` sub-command."""
    p = subparsers.add_parser(NAME, help="verify a converted folder and upload it to the Hugging Face Hub",
                              description=help_description(__doc__))
    # an empty name (an unset shell variable) would be the current folder (found by an audit)
    p.add_argument("folder", type=named_output("converted/shvit_s1"), help="folder written by `vitzoo convert`")
    p.add_argument("--repo", required=True, help="Hub repo, org/name")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--token", default=None, help="Hub token (default: saved login or HF_TOKEN)")
    p.add_argument("--force", action="store_true",
                   help="replace the weights of an existing repo whose config.json names another architecture")
    p.set_defaults(func=run)


def _is_network_error(error: BaseException) -> bool:
    """A connection error (refused, offline mode, DNS, timeout) or a transport error of the HTTP client library."""
    clients = ("httpx", "httpcore", "requests", "urllib3")
    return (isinstance(error, (ConnectionError, TimeoutError, socket.gaierror))
            or type(error).__module__.split(".")[0].startswith(clients))


# what to do about the Hub's refusals, by HTTP status (the Hub client's own message spans several lines)
_HTTP_ADVICE = {
    401: "the Hub did not accept the token: log in with `hf auth login`, set HF_TOKEN, or pass --token with a valid "
         "token",
    403: "the token may not read or write {repo}: use a token with write access to it (a fine-grained token needs "
         "write access to that repo or organisation)",
    404: "{repo} or the revision was not found, or the token cannot see it",
    429: "the Hub's rate limit was reached: wait a few minutes and run the same command again",
}


def _http_error_line(error: BaseException, repo: str) -> str:
    """One line for a Hub HTTP error: the status, what it means for a push, the Hub's own message if short."""
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    reason = getattr(response, "reason_phrase", "") or ""
    request = getattr(response, "request", None)
    where = f" to {request.method} {request.url.path}" if request is not None and hasattr(request, "url") else ""
    advice = _HTTP_ADVICE.get(status)
    if advice is None:
        advice = ("the Hub had a problem: try again later" if isinstance(status, int) and status >= 500
                  else "see the Hub's message")
    server = " ".join(str(getattr(error, "server_message", None) or "").split())[:200]
    said = f" (the Hub says: {server.rstrip('.')})" if server else ""
    return (f"the Hub answered {status} {reason}".rstrip() + f"{where}{said}: {advice.format(repo=repo)}. No file was "
            f"uploaded.")


def run(args: argparse.Namespace) -> int:
    """Run ``vitzoo push``; returns the exit code (0 ok, 2 a bad --repo, 1 refused or failed; with a message on
    stderr)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        url = push_folder(args.folder, args.repo, private=args.private, revision=args.revision, token=args.token,
                          force=getattr(args, "force", False))
    except UsageError as e:
        print(f"vitzoo push: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"vitzoo push: refusing to upload {args.folder}: {e}", file=sys.stderr)
        return 1
    except HfHubHTTPError as e:
        print(f"vitzoo push: error: {_http_error_line(e, args.repo)}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"vitzoo push: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001  the HTTP client's own transport errors (not OSErrors)
        if not _is_network_error(e):
            raise
        print(f"vitzoo push: network error, nothing was uploaded: {type(e).__name__}: {str(e).rstrip('.')}. Check "
              "the connection (and HF_ENDPOINT / HF_HUB_OFFLINE).", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} -> {args.repo}: {url}")
    return 0
