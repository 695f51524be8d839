"""A loopback stand-in for the Hugging Face Hub, for tests (standard library only).

It serves the few endpoints that ``huggingface_hub`` 2.4 uses to download a file and to upload a small
folder, with files held in memory as ``{"org/name": {"file name": bytes}}``:

* ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}``: the file, with the ``X-Repo-Commit`` and
  ``ETag`` headers the client requires (404 + ``X-Error-Code: EntryNotFound`` / ``RepoNotFound`` otherwise).
* ``POST /api/repos/create``: creates an empty repo (409 if it exists).
* ``POST /api/validate-yaml``: accepts any model card.
* ``POST /api/models/{org}/{name}/preupload/{revision}``: answers ``uploadMode: regular`` for every file,
  so the file contents travel base64-encoded inside the commit (no LFS or Xet transfer).
* ``POST /api/models/{org}/{name}/commit/{revision}``: stores the files of an ndjson commit.

Every request is recorded in ``LoopbackHub.requests`` as ``(method, path)`` so tests can count them.
Per-file overrides let a test serve corrupt or truncated bytes under a correct-looking ETag.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

COMMIT_SHA = "0123456789abcdef0123456789abcdef01234567"


class LoopbackHub:
    """An in-memory Hub on ``127.0.0.1:<ephemeral port>``, run in a daemon thread.

    Args:
        repos: initial repositories, ``{"org/name": {"file name": bytes}}``.
    """

    def __init__(self, repos: Optional[Dict[str, Dict[str, bytes]]] = None):
        self.repos: Dict[str, Dict[str, bytes]] = {k: dict(v) for k, v in (repos or {}).items()}
        self.private: Dict[str, bool] = {}
        self.requests: List[Tuple[str, str]] = []
        self.commits: List[dict] = []
        # (repo, file) -> bytes actually sent in place of the stored file (the ETag and size stay those of the
        # stored file): lets a test simulate a corrupted or truncated transfer
        self.tamper: Dict[Tuple[str, str], bytes] = {}
        self.gated: set = set()  # repos whose conditions this caller has not accepted (403, X-Error-Code GatedRepo)
        self.down: Optional[int] = None  # an HTTP status every download request is answered with (503: the Hub down)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LoopbackHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


def _make_handler(hub: LoopbackHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # ---- helpers
        def _parts(self) -> List[str]:
            path = unquote(urlsplit(self.path).path)
            return path.strip("/").split("/")

        def _reply(self, code: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
                   send_body: bool = True, length: Optional[int] = None) -> None:
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if send_body and body:
                self.wfile.write(body)
            if length is not None and length != len(body):
                self.close_connection = True

        def _json(self, code: int, obj: dict) -> None:
            self._reply(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _not_found(self, error_code: str, send_body: bool = True) -> None:
            self._reply(404, b"", {"X-Error-Code": error_code, "X-Repo-Commit": COMMIT_SHA}, send_body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        # ---- downloads
        def _resolve(self, send_body: bool) -> None:
            hub.record(self.command, self.path)
            if hub.down is not None:
                return self._reply(hub.down, b"", {}, send_body)
            parts = self._parts()
            if len(parts) <= 4 or parts[2] != "resolve":
                return self._not_found("RepoNotFound", send_body)
            repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in hub.repos:
                return self._not_found("RepoNotFound", send_body)
            if repo in hub.gated:
                return self._reply(403, b"", {"X-Error-Code": "GatedRepo", "X-Repo-Commit": COMMIT_SHA}, send_body)
            data = hub.repos[repo].get(filename)
            if data is None:
                return self._not_found("EntryNotFound", send_body)
            sent = hub.tamper.get((repo, filename), data)
            headers = {"X-Repo-Commit": COMMIT_SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            self._reply(200, sent, headers, send_body, length=len(data))

        def do_HEAD(self) -> None:
            self._resolve(send_body=False)

        def do_GET(self) -> None:
            parts = self._parts()
            if parts[:2] == ["api", "models"] and len(parts) == 4:  # HfApi.repo_info
                hub.record("GET", self.path)
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self._not_found("RepoNotFound")
                return self._json(200, {"id": repo, "sha": COMMIT_SHA, "private": hub.private.get(repo, False),
                                        "siblings": [{"rfilename": name} for name in sorted(hub.repos[repo])]})
            self._resolve(send_body=True)

        # ---- uploads
        def do_POST(self) -> None:
            hub.record("POST", self.path)
            parts, body = self._parts(), self._body()
            if parts[:3] == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body))
            if parts[:2] == ["api", "validate-yaml"]:
                return self._json(200, {"errors": [], "warnings": []})
            if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self._not_found("RepoNotFound")
                if parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                return self._commit(repo, body)
            return self._not_found("RepoNotFound")

        def _create_repo(self, payload: dict) -> None:
            repo = f"{payload.get('organization')}/{payload['name']}"
            if repo in hub.repos:
                return self._json(409, {"error": "You already created this model repo", "url": repo})
            hub.repos[repo] = {}
            hub.private[repo] = payload.get("visibility") == "private"
            return self._json(200, {"url": f"{hub.endpoint}/{repo}"})

        def _commit(self, repo: str, body: bytes) -> None:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {}
            for item in lines:
                if item["key"] == "file":
                    value = item["value"]
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] != "header":
                    return self._json(400, {"error": f"loopback hub does not accept {item['key']!r}"})
            hub.repos[repo].update(files)
            hub.commits.append({"repo": repo, "lines": lines, "files": files})
            return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{COMMIT_SHA}",
                                    "commitOid": COMMIT_SHA})

    return Handler


def use_loopback_hub(monkeypatch, tmp_path, repos: Optional[Dict[str, Dict[str, bytes]]] = None) -> LoopbackHub:
    """Start a :class:`LoopbackHub` and point ``huggingface_hub`` at it, with a fresh cache, online.

    ``HF_ENDPOINT`` is read at import, so the two constants derived from it are patched; the cache folder and
    offline flag are read at call time. Stop the returned hub when done (``monkeypatch`` undoes the rest).
    """
    from huggingface_hub import constants

    hub = LoopbackHub(repos).start()
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return hub
