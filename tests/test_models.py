"""vitzoo.models: the input size a built model takes, and name resolution for the comparison and load paths."""
import json

import pytest
import timm
import torch

from hub_server import use_loopback_hub  # tests/hub_server.py
from vitzoo import cli
from vitzoo.models import UnknownModelError, model_input_size, resolve_name


def test_deploy_runs_a_fixed_size_model_at_the_size_it_was_built_for():
    """``vitzoo.deploy`` of LeViT built for 256 ran its example input at the cfg's 224 and failed."""
    import vitzoo
    from norms import randomize_norms  # tests/norms.py

    torch.manual_seed(0)
    # norms randomised: at default init the logits are ~4e-5, and an all-zero output passed atol 1e-4 (an audit)
    model = randomize_norms(timm.create_model("levit_128s", img_size=256, num_classes=10)).eval()
    deployed = vitzoo.deploy(model)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = model(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(deployed(x), expected, atol=1e-4, rtol=0)


def test_a_recorded_img_size_is_used_without_timms_record_of_the_arguments():
    """Without ``_model_args`` (a model built by an older timm or its class directly), the size the model records
    (CoAtNet's ``img_size``, Twins' ``patch_embeds[0].img_size``) is the one it was built for."""
    for name in ("coatnet_nano_rw_224", "twins_pcpvt_small"):
        model = timm.create_model(name, img_size=256)
        del model._model_args
        assert model_input_size(model) == (3, 256, 256)


def _compare(capsys, *argv):
    code = cli.main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("prefix", ["hf_hub:", "hf-hub:", "HF-HUB:"])
def test_compare_takes_a_hub_name_in_every_spelling_timm_takes(prefix, capsys, monkeypatch, tmp_path):
    """``hf_hub:`` (timm's older spelling, which it still accepts) was an "unknown model"."""
    config = {"architecture": "shvit_s1", "num_classes": 10, "pretrained_cfg": {"input_size": [3, 160, 160]}}
    hub = use_loopback_hub(monkeypatch, tmp_path, {"timm/shvit_s1.in1k": {"config.json": json.dumps(config).encode()}})
    try:
        code, out, err = _compare(capsys, f"{prefix}timm/shvit_s1.in1k", "--no-speed", "--format", "json")
    finally:
        hub.stop()
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["input_size"] == [3, 160, 160]  # the Hub config's, not shvit_s1's 224
    assert row["params"] == sum(p.numel() for p in timm.models.shvit.shvit_s1(num_classes=10).parameters())
    assert resolve_name(f"{prefix}timm/shvit_s1.in1k", allow_folders=True) == ("hf-hub:timm/shvit_s1.in1k", None)


def test_a_hub_repo_id_without_its_prefix_is_pointed_to_the_prefix(capsys):
    code, _, err = _compare(capsys, "timm/shvit_s1.in1k", "--no-speed")
    assert code == 2
    assert "closest matches: shvit_s1" in err
    assert "for a Hugging Face Hub repo give 'hf-hub:timm/shvit_s1.in1k'" in err


def test_a_prefix_with_nothing_after_it_is_named():
    with pytest.raises(UnknownModelError, match=r"'hf_hub:': nothing after 'hf-hub:'; give hf-hub:org/name"):
        resolve_name("hf_hub:", allow_folders=True)
    with pytest.raises(UnknownModelError, match="a weights folder is not accepted here"):
        resolve_name("hf_hub:timm/shvit_s1.in1k")
