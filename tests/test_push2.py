"""`vitzoo push` (audit): an existing repo of another architecture needs --force, and the Hub's HTTP refusals are
one line each, against the loopback Hub of tests/hub_server.py."""
import json

import pytest
import timm
import torch

import hub_server
from hub_server import use_loopback_hub
from vitzoo.cli import main
from vitzoo.convert import convert_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("shvit_s1").eval()
    root = tmp_path_factory.mktemp("push2")
    torch.save(model.state_dict(), root / "src.pth")
    return convert_checkpoint(root / "src.pth", "shvit_s1", root / "folder", tag="in1k", flops=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = use_loopback_hub(monkeypatch, tmp_path)
    yield server
    server.stop()


@pytest.mark.parametrize("config, names", [
    ({"architecture": "resnet50", "num_classes": 1000}, "names architecture 'resnet50'"),
    ({"architectures": ["ViTForImageClassification"]}, "names no timm architecture"),
    ("not json", "names no timm architecture"),
], ids=["other-timm-model", "transformers-config", "unreadable"])
def test_push_over_another_architecture_needs_force(hub, converted, capsys, config, names):
    """Found by an audit: pushing shvit_s1 into a repo holding another model replaced its weights unasked (writers
    never overwrite unless asked); the same architecture is still updated without --force."""
    old = {"config.json": (config if isinstance(config, str) else json.dumps(config)).encode(),
           "model.safetensors": b"someone else's weights", "README.md": b"their card"}
    hub.repos["me/other"] = dict(old)
    assert main(["push", str(converted), "--repo", "me/other", "--token", "hf_test"]) == 1
    err = capsys.readouterr().err
    assert err == (f"vitzoo push: error: Hub repo 'me/other' exists and its config.json {names}, not 'shvit_s1'; "
                   "pushing would replace its weights with another model's, so nothing was uploaded. Pass --force to "
                   "replace them, or push to a new repo.\n"), err
    assert hub.commits == [] and hub.repos["me/other"] == old
    assert not any(method == "POST" for method, _ in hub.requests)

    assert main(["push", str(converted), "--repo", "me/other", "--force"]) == 0
    assert [c["repo"] for c in hub.commits] == ["me/other"]
    assert json.loads(hub.repos["me/other"]["config.json"])["architecture"] == "shvit_s1"
    assert main(["push", str(converted), "--repo", "me/other"]) == 0  # now the same architecture: a new version


def test_push_a_new_version_of_the_same_architecture_without_force(hub, converted):
    hub.repos["me/same"] = {"config.json": json.dumps({"architecture": "shvit_s1"}).encode(),
                            "model.safetensors": b"old version", "pytorch_model.bin": b"older"}
    assert main(["push", str(converted), "--repo", "me/same"]) == 0
    assert hub.repos["me/same"]["model.safetensors"] == (converted / "model.safetensors").read_bytes()
    assert hub.repos["me/same"]["pytorch_model.bin"] == b"older"  # documented: other files stay
    hub.repos["me/card-only"] = {"README.md": b"a card"}  # no config.json: nothing of a model to replace
    assert main(["push", str(converted), "--repo", "me/card-only"]) == 0


def _failing_hub(monkeypatch, tmp_path, where, status):
    """A loopback Hub whose requests with ``where`` in their path are answered ``status``, with a Hub message."""
    make = hub_server._make_handler

    def factory(hub):
        base = make(hub)

        class Failing(base):
            def _fail(self):
                if where not in self.path:
                    return False
                hub.record(self.command, self.path)
                if self.command != "HEAD":
                    self._body()
                self._reply(status, b'{"error": "Invalid credentials in Authorization header"}',
                            {"Content-Type": "application/json", "X-Error-Message": "Invalid credentials"},
                            send_body=self.command != "HEAD")
                return True

            def do_HEAD(self):
                if not self._fail():
                    base.do_HEAD(self)

            def do_GET(self):
                if not self._fail():
                    base.do_GET(self)

            def do_POST(self):
                if not self._fail():
                    base.do_POST(self)

        return Failing

    monkeypatch.setattr(hub_server, "_make_handler", factory)
    return use_loopback_hub(monkeypatch, tmp_path)


@pytest.mark.parametrize("where, status, advice", [
    ("/api/models/me/", 401, "the Hub did not accept the token: log in with `hf auth login`, set HF_TOKEN, or pass "
                             "--token with a valid token"),
    ("/api/repos/create", 401, "the Hub did not accept the token"),
    ("/api/repos/create", 403, "the token may not read or write me/new: use a token with write access to it"),
    ("/commit/", 403, "the token may not read or write me/new"),
    ("/api/models/me/", 429, "the Hub's rate limit was reached: wait a few minutes and run the same command again"),
])
def test_hub_http_errors_are_one_line_without_the_token(converted, monkeypatch, tmp_path, capsys, where, status,
                                                        advice):
    """Found by an audit: a 401 / 403 / 429 printed the Hub client's message over five lines (a MDN link, the
    response body twice), with no word on what to do or whether anything was uploaded."""
    hub = _failing_hub(monkeypatch, tmp_path, where, status)
    try:
        assert main(["push", str(converted), "--repo", "me/new", "--token", "hf_secret_token_value"]) == 1
    finally:
        hub.stop()
    err = capsys.readouterr().err
    assert err.startswith(f"vitzoo push: error: the Hub answered {status} ") and err.count("\n") == 1, err
    assert "(the Hub says: Invalid credentials" in err and advice in err and err.endswith("No file was uploaded.\n")
    assert "hf_secret_token_value" not in err and "Traceback" not in err
    assert hub.commits == [] and all(not files for files in hub.repos.values())


@pytest.mark.parametrize("token", ["", "  "])
def test_an_empty_token_is_a_usage_error_before_any_request(hub, converted, capsys, monkeypatch, token):
    """Found by an audit: ``--token "$HF_TOKEN"`` with the variable unset sent an empty ``Authorization: Bearer``
    header, ignoring the saved login and HF_TOKEN, and the Hub's 401 said nothing of why."""
    monkeypatch.setenv("HF_TOKEN", "hf_from_the_environment")
    assert main(["push", str(converted), "--repo", "me/x", "--token", token]) == 2
    err = capsys.readouterr().err
    assert err == ("vitzoo push: error: --token is empty (an unset shell variable?); leave it out to use the saved "
                   "login (`hf auth login`) or HF_TOKEN.\n"), err
    assert hub.requests == [] and hub.repos == {}


@pytest.mark.parametrize("status", [503, 429])
def test_a_failed_architecture_check_stops_the_push(converted, monkeypatch, tmp_path, capsys, status):
    """Found by a review: when the repo's config.json could not be fetched (the Hub answered 503 / 429, or the
    network failed), the client's LocalEntryNotFoundError was taken for "no config.json" and the push went on,
    replacing another model's weights unchecked."""
    hub = _failing_hub(monkeypatch, tmp_path, "/resolve/", status)
    old = {"config.json": json.dumps({"architecture": "resnet50"}).encode(), "model.safetensors": b"theirs"}
    hub.repos["me/other"] = dict(old)
    try:
        assert main(["push", str(converted), "--repo", "me/other", "--token", "hf_test"]) == 1
    finally:
        hub.stop()
    err = capsys.readouterr().err
    assert err.startswith(f"vitzoo push: error: the Hub answered {status} ") and err.count("\n") == 1, err
    assert err.endswith("No file was uploaded.\n") and hub.commits == [] and hub.repos["me/other"] == old
    assert "config.json" in err and not any(method == "POST" for method, _ in hub.requests)  # stopped at the check
