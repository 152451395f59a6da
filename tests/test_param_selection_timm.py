"""Which parameters each preset adapts on transformer and ConvNeXt backbones (timm's ViT, Swin and ConvNeXt, built
with pretrained=False and shrunk where timm allows), against each official code's selection rule transcribed here
on its own: tent.py / EATA's eata.py (BatchNorm2d only), the TTA zoo's tent (BatchNorm2d, LayerNorm, GroupNorm) and
eata (BatchNorm1d too), mr-eggplant/SAR sar.py (norm layers outside its top-block and `norm` rules), qinenergy/cotta
imagenet/cotta.py (every parameter named weight or bias); SAR's and CoTTA's are tests/official_code.py's. The
presets' numbers are checked on tiny batch-norm networks elsewhere (test_official_presets, test_tent_official,
test_zoo_presets); this checks the names."""
import pytest
import torch.nn as nn

import tta

from official_code import cotta_collect_params, cotta_configure_model, sar_collect_params

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest
timm = pytest.importorskip("timm")

BACKBONES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32}, 32),   # 12 blocks: SAR's blocks.9-11 rule applies
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "embed_dim": 24,
                                              "depths": (1, 1, 2, 1), "num_heads": (1, 1, 1, 1)}, 64),
    "convnext": ("convnext_atto", {}, 32),
}


def backbone(kind):
    name, kwargs, size = BACKBONES[kind]
    net = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    return net, tta.wrap_model(net, class_names=[f"c{i}" for i in range(5)], input_size=(3, size, size))


def adapted(kind, method, **config):
    """The names the adapter updates, as the network's own (without the wrapper's `net.`)."""
    _, model = backbone(kind)
    names = tta.create_adapter(method, model, **config).adapted_names
    assert all(n.startswith("net.") for n in names)
    return {n[len("net."):] for n in names}


def affine_of(net, layer_types):
    """tent.py / eata.py collect_params, with the layer types each repository names."""
    names = set()
    for nm, m in net.named_modules():
        if isinstance(m, layer_types):
            for np_, p in m.named_parameters():
                if np_ in ["weight", "bias"]:
                    names.add(f"{nm}.{np_}")
    return names


def sar_names(net):
    """mr-eggplant/SAR sar.py collect_params (official_code.py): the names it returns."""
    return set(sar_collect_params(net)[1])


def cotta_names(net):
    """qinenergy/cotta imagenet/cotta.py configure_model, then collect_params (official_code.py): configure_model
    turns on every parameter; collect_params takes, module by module, the parameters named exactly weight or bias."""
    return set(cotta_collect_params(cotta_configure_model(net))[1])


ZOO_TENT_NORMS = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)               # the zoo's methods/tent.py
ZOO_EATA_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)  # the zoo's methods/eata.py
SAR_EATA_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)                # mr-eggplant/SAR eata.py


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_tent_and_eata_adapt_every_norm_layer_by_default_as_the_zoo(kind):
    net, _ = backbone(kind)
    expected = {"tent": affine_of(net, ZOO_TENT_NORMS), "eata": affine_of(net, ZOO_EATA_NORMS)}
    assert expected["tent"] and expected["eata"] == expected["tent"] == affine_of(net, SAR_EATA_NORMS)
    assert not affine_of(net, (nn.BatchNorm2d,))
    for method in ("tent", "eata"):
        for preset in ("tta", "zoo-cifar10", "zoo-imagenet"):
            assert adapted(kind, method, preset=preset) == expected[method], (method, preset)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_official_tent_and_eata_find_nothing_to_adapt_without_batch_norm(kind):
    """The authors' collect_params returns no parameter here (their check_model asserts): refused, with the way out."""
    for method, presets in (("tent", ("official-cifar10", "official-imagenet")), ("eata", ("official",))):
        for preset in presets:
            with pytest.raises(ValueError, match="set norms: all"):
                adapted(kind, method, preset=preset)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
@pytest.mark.parametrize("preset", ["official", "zoo-cifar10"])
def test_sar_official_rules(kind, preset):
    net, _ = backbone(kind)
    expected = sar_names(net)
    assert adapted(kind, "sar", preset=preset) == expected
    if kind == "vit":  # the top blocks and the final norm stay fixed
        assert not any(n.startswith(("blocks.9.", "blocks.10.", "blocks.11.", "norm.")) for n in expected)
        assert "blocks.8.norm1.weight" in expected
    else:  # Swin's top-level norm is left out; ConvNeXt's head.norm is not (its name has no "norm.")
        assert "norm.weight" not in expected
        assert kind != "convnext" or "head.norm.weight" in expected


@pytest.mark.parametrize("kind", sorted(BACKBONES))
@pytest.mark.parametrize("preset", ["official-cifar10", "official-imagenet", "zoo-cifar10", "zoo-imagenet"])
def test_cotta_official_adapts_weights_and_biases_only(kind, preset):
    net, _ = backbone(kind)
    expected = cotta_names(net)
    ours = adapted(kind, "cotta", preset=preset)
    assert ours == expected
    everything = {n for n, _ in net.named_parameters()}
    fixed = {"vit": {"cls_token", "pos_embed"}, "swin": {"layers.0.blocks.0.attn.relative_position_bias_table"},
             "convnext": {"stages.0.blocks.0.gamma"}}[kind]
    assert fixed <= everything - ours
    assert adapted(kind, "cotta") == everything  # the tta preset adapts every parameter
