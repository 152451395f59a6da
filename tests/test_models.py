"""Model sources: tiny random architectures built here, saved and re-loaded through the local-weights path."""
import json

import pytest
import torch

import tta
from tta.models.wrapper import check_images


def test_timm_source_and_local_weights(tmp_path):
    model = tta.create_model("timm:test_resnet", pretrained=False, num_classes=10)
    assert model.num_classes == 10 and model.input_size[0] == 3
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.net.state_dict().items()}}, path)
    again = tta.create_model("timm:test_resnet", weights=path, num_classes=10)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), again.eval()(x))


def test_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tta.create_model("timm:test_resnet", pretrained=False, num_classes=10).net.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        tta.create_model("timm:test_resnet", weights=path, num_classes=7)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tta.create_model("timm:test_resnet", weights=tmp_path / "missing.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        tta.create_model("timm:test_resnet", weights=tmp_path / "broken.pth")


def test_torchvision_source_normalises_itself():
    model = tta.create_model("tv:resnet18", pretrained=False, num_classes=4).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.net((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                             / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        torch.testing.assert_close(model(x), expected)


def test_unknown_sources_and_weights():
    with pytest.raises(KeyError, match="Valid choices: .*timm, tv"):
        tta.create_model("hub:resnet50")
    with pytest.raises(ValueError, match="<source>:<name>"):
        tta.create_model("resnet50")
    with pytest.raises(KeyError, match="IMAGENET1K_V1"):
        tta.create_model("tv:mobilenet_v2@IMAGENET9K")


def tiny_clip_config(tmp_path):
    import open_clip
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tta-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "tta-tiny-clip"


def test_clip_zero_shot_head(tmp_path):
    arch = tiny_clip_config(tmp_path)
    names = ["cat", "dog", "car"]
    model = tta.create_model(f"clip:{arch}", pretrained=False, class_names=names)
    assert model.class_names == names and model.input_size == (3, 32, 32)
    head = model.net.text_embeddings
    assert head.shape == (3, 16)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(3))
    logits = tta.create_adapter("tent", model)(torch.rand(4, 3, 32, 32))
    assert logits.shape == (4, 3)


def test_smp_segmenter_and_depth():
    seg = tta.create_model("smp:Unet/resnet18", pretrained=False, num_classes=4, input_size=(3, 64, 64))
    assert seg.task == "segmentation"
    assert tta.create_adapter("tent", seg)(torch.rand(2, 3, 64, 64)).shape == (2, 4, 64, 64)
    depth = tta.create_model("smp:Unet/resnet18", pretrained=False, task="depth", input_size=(3, 64, 64))
    assert depth.task == "depth" and depth.class_names is None
    with torch.no_grad():
        assert depth.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="smp:<arch>/<encoder>"):
        tta.create_model("smp:Unet", pretrained=False, num_classes=3)


def test_check_images_accepts_valid_images():
    check_images(torch.rand(2, 3, 8, 8), 3)
    check_images(torch.zeros(1, 1, 8, 8), 1)


@pytest.mark.slow  # a fresh interpreter
def test_import_tta_needs_only_torch():
    import subprocess
    import sys
    code = ("import sys, tta; heavy = [m for m in ('timm', 'open_clip', 'segmentation_models_pytorch', 'diffusers', "
            "'torchvision') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_created_models_come_in_eval_mode():
    """Calling a freshly created model must not update its batch-norm statistics (train mode would)."""
    model = tta.create_model("zoo:fmnist-cnn")
    assert not any(m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.rand(8, 1, 28, 28))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
