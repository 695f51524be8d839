"""vitzoo.models: the input size a built model takes, and name resolution for the comparison and load paths."""
import timm
import torch

from vitzoo.models import model_input_size


def test_deploy_runs_a_fixed_size_model_at_the_size_it_was_built_for():
    """``vitzoo.deploy`` of LeViT built for 256 ran its example input at the cfg's 224 and failed."""
    import vitzoo

    model = timm.create_model("levit_128s", img_size=256, num_classes=10).eval()
    deployed = vitzoo.deploy(model)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4)


def test_a_recorded_img_size_is_used_without_timms_record_of_the_arguments():
    """Without ``_model_args`` (a model built by an older timm or its class directly), the size the model records
    (CoAtNet's ``img_size``, Twins' ``patch_embeds[0].img_size``) is the one it was built for."""
    for name in ("coatnet_nano_rw_224", "twins_pcpvt_small"):
        model = timm.create_model(name, img_size=256)
        del model._model_args
        assert model_input_size(model) == (3, 256, 256)
