"""The data layouts the benchmarks read: synthetic trees in each standard layout, and the errors for missing
or malformed copies (they must say what was expected where)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tta.data.cifar_c import CIFARC
from tta.data.corruption_cache import CorruptedDataset
from tta.data.dense import ADE20K, NYUv2Depth
from tta.data.imagenet_c import imagenet_c_items, imagenet_variant_items, imagenet_wnids
from tta.data.images import ImageList, foolbox_images
from tta.data.subsample import per_class_indices
from tta.data.zeroshot import ZEROSHOT_SETS, open_zeroshot, templates_for

WNIDS = imagenet_wnids()


def _jpeg(path, size=(24, 20), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_imagenet_c_layout_and_labels(tmp_path):
    for cls in (3, 7):
        for k in range(2):
            _jpeg(tmp_path / "fog" / "5" / WNIDS[cls] / f"img{k}.JPEG", value=cls * 10 + k)
    items = imagenet_c_items(tmp_path, "fog", 5)
    assert [label for _, label in items] == [3, 3, 7, 7]
    x, y = ImageList(items, (3, 16, 16))[0]
    assert x.shape == (3, 16, 16) and y == 3


def test_imagenet_c_grouped_archive_layout(tmp_path):
    _jpeg(tmp_path / "noise" / "gaussian_noise" / "3" / WNIDS[0] / "a.JPEG")
    assert imagenet_c_items(tmp_path, "gaussian_noise", 3)[0][1] == 0


def test_imagenet_c_missing_says_layout_and_source(tmp_path):
    _jpeg(tmp_path / "fog" / "5" / WNIDS[0] / "a.JPEG")
    with pytest.raises(FileNotFoundError, match=r"contrast/5.*<corruption>/<severity>.*zenodo"):
        imagenet_c_items(tmp_path, "contrast", 5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        imagenet_c_items(tmp_path / "nope", "fog", 5)


def test_imagenet_c_rejects_unknown_class_folders(tmp_path):
    _jpeg(tmp_path / "fog" / "5" / "cats" / "a.JPEG")
    with pytest.raises(ValueError, match="wnid"):
        imagenet_c_items(tmp_path, "fog", 5)


def test_imagenet_r_subset_from_wnid_folders(tmp_path):
    chosen = list(range(0, 1000, 5))  # 200 classes
    for i in chosen:
        _jpeg(tmp_path / WNIDS[i] / "a.jpg", size=(8, 8))
    items, subset = imagenet_variant_items(tmp_path, "r")
    assert subset == chosen and len(items) == 200
    (tmp_path / WNIDS[0] / "a.jpg").unlink()
    (tmp_path / WNIDS[0]).rmdir()
    with pytest.raises(ValueError, match="199 class folders, expected 200"):
        imagenet_variant_items(tmp_path, "r")


def test_imagenet_v2_index_folders(tmp_path):
    _jpeg(tmp_path / "0" / "a.jpeg")
    _jpeg(tmp_path / "999" / "b.jpeg")
    items, subset = imagenet_variant_items(tmp_path, "v2")
    assert [label for _, label in items] == [0, 999] and subset is None


def _cifar_c(root, n_sev=5):
    root.mkdir(parents=True, exist_ok=True)
    data = np.zeros((n_sev * 10000, 32, 32, 3), dtype=np.uint8)
    for s in range(n_sev):
        data[s * 10000:(s + 1) * 10000] = 40 * s  # severity s+1 is recognisable by its value
    np.save(root / "fog.npy", data)
    np.save(root / "labels.npy", np.tile(np.arange(10000) % 10, n_sev))


def test_cifar_c_severity_slices(tmp_path):
    _cifar_c(tmp_path)
    ds = CIFARC(tmp_path, "fog", 3, (3, 32, 32))
    x, y = ds[12]
    assert len(ds) == 10000 and y == 2 and torch.allclose(x, torch.full_like(x, 80 / 255))
    assert ds.class_names[0] == "airplane"
    assert CIFARC(tmp_path, "fog", 1, (3, 64, 64))[0][0].shape == (3, 64, 64)


def test_cifar_c_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fog\.npy.*<corruption>\.npy.*zenodo"):
        CIFARC(tmp_path, "fog", 5)
    np.save(tmp_path / "fog.npy", np.zeros((10, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(10))
    with pytest.raises(ValueError, match="50000 x 32 x 32 x 3"):
        CIFARC(tmp_path, "fog", 5)


def test_subsample_is_seeded_per_class_and_parallel():
    labels = [i % 4 for i in range(40)]
    a = per_class_indices(labels, 3, seed=1)
    assert len(a) == 12 and sorted({labels[i] for i in a}) == [0, 1, 2, 3]
    assert all(sum(labels[i] == c for i in a) == 3 for c in range(4))
    assert a == per_class_indices(labels, 3, seed=1) and a != per_class_indices(labels, 3, seed=2)
    assert per_class_indices(labels, None) == list(range(40))
    with pytest.raises(ValueError):
        per_class_indices(labels, 0)


def _food101(root, classes=("apple_pie", "ramen"), per_class=3):
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    test = {}
    for c in classes:
        test[c] = []
        for k in range(per_class):
            _jpeg(base / "images" / c / f"{k}.jpg", size=(40, 30), value=k)
            test[c].append(f"{c}/{k}")
    (base / "meta" / "test.json").write_text(json.dumps(test))
    (base / "meta" / "classes.txt").write_text("\n".join(classes))


def test_zeroshot_food101_from_local_root(tmp_path):
    _food101(tmp_path)
    ds = open_zeroshot("food101", tmp_path, (3, 32, 32))
    assert ds.class_names == ["apple pie", "ramen"] and len(ds) == 6
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and y == 1 and ds.targets == [0, 0, 0, 1, 1, 1]
    assert templates_for("food101") == ("a photo of {}, a type of food.",)
    assert templates_for("cifar10", "single") == ("a photo of a {}.",)
    assert len(templates_for("cifar100")) == 18


def test_zeroshot_missing_never_downloads_and_says_how(tmp_path):
    for name in ZEROSHOT_SETS:
        if name == "flowers102":
            continue  # its integrity check needs scipy, which the test extra does not promise
        with pytest.raises(FileNotFoundError, match="--download"):
            open_zeroshot(name, tmp_path)
    assert list(tmp_path.iterdir()) == [] or all(p.is_dir() for p in tmp_path.iterdir())
    with pytest.raises(KeyError, match="oxford_pets"):
        open_zeroshot("pets", tmp_path)


def test_ade20k_masks_shift_and_ignore(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _jpeg(base / "images" / "validation" / "ADE_val_1.jpg", size=(20, 16))
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[:, 10:] = 5
    (base / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(mask).save(base / "annotations" / "validation" / "ADE_val_1.png")
    x, m = ADE20K(tmp_path, input_size=(3, 8, 10))[0]
    assert x.shape == (3, 8, 10) and m.shape == (8, 10)
    assert set(m[:, :5].unique().tolist()) == {255} and set(m[:, 5:].unique().tolist()) == {4}
    (base / "annotations" / "validation" / "ADE_val_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="has no mask.*ADEChallengeData2016"):
        ADE20K(tmp_path)


def test_nyuv2_folder_and_denseDepth_layouts(tmp_path):
    folder = tmp_path / "folder"
    _jpeg(folder / "rgb" / "0001.png", size=(12, 10))
    (folder / "depth").mkdir()
    Image.fromarray(np.full((10, 12), 2500, dtype=np.uint16)).save(folder / "depth" / "0001.png")
    x, d = NYUv2Depth(folder, (3, 10, 12))[0]
    assert x.shape == (3, 10, 12) and d.shape == (1, 10, 12) and torch.allclose(d, torch.full_like(d, 2.5))

    arrays = tmp_path / "npy"
    arrays.mkdir()
    np.save(arrays / "eigen_test_rgb.npy", np.zeros((2, 10, 12, 3), dtype=np.uint8))
    np.save(arrays / "eigen_test_depth.npy", np.ones((2, 10, 12), dtype=np.float32))
    np.save(arrays / "eigen_test_crop.npy", np.array([2, 8, 0, 12]))
    ds = NYUv2Depth(arrays, (3, 10, 12))
    _, d = ds[1]
    assert len(ds) == 2 and d[0, :2].eq(0).all() and d[0, 2:8].eq(1).all()
    with pytest.raises(FileNotFoundError, match="eigen_test_rgb.npy"):
        NYUv2Depth(tmp_path / "empty_missing")


def test_corruption_cache_writes_imagenet_c_layout_and_rereads(tmp_path):
    items = foolbox_images("cifar10")[:3]
    base = ImageList(items, (3, 32, 32))
    cached = CorruptedDataset(base, "gaussian_noise", 3, seed=0, cache_dir=tmp_path, source="foolbox:cifar10",
                              input_size=(3, 32, 32))
    first = [cached[i] for i in range(3)]
    files = sorted(tmp_path.glob("gaussian_noise/3/*/*.png"))
    assert len(files) == 3 and files[0].parent.name == str(items[0][1])
    again = [cached[i][0] for i in range(3)]
    plain = CorruptedDataset(base, "gaussian_noise", 3, seed=0)
    assert all(torch.equal(a[0], b) for a, b in zip(first, again))
    assert all(torch.equal(a[0], plain[i][0]) for i, a in enumerate(first))  # cache == on the fly, bit for bit
    assert not torch.equal(first[0][0], base[0][0])
    # the cached folder reads back as an ImageNet-C tree (class folders by index)
    assert [label for _, label in imagenet_c_items(tmp_path, "gaussian_noise", 3)] == sorted(l for _, l in items)
    with pytest.raises(ValueError, match="was made for"):
        CorruptedDataset(base, "fog", 3, seed=1, cache_dir=tmp_path, source="foolbox:cifar10", input_size=(3, 32, 32))


@pytest.mark.parametrize("name", ["impulse_noise", pytest.param("glass_blur", marks=pytest.mark.slow)])  # 3-5 s
def test_corruptions_drawn_outside_numpys_global_generator_are_seeded(name):
    """imagecorruptions draws these two from a generator of their own: corrupt_images must seed it per image."""
    from tta.data.corruptions import corrupt_images
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a, b, c = (corrupt_images(x, name, 3, seed=s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])


def test_version_1_corruption_cache_drops_only_the_unseeded_corruptions(tmp_path):
    from tta.data.corruption_cache import CACHE_VERSION, MANIFEST, check_manifest
    old = {"source": "foolbox:cifar10", "input_size": [3, 32, 32], "seed": 0, "format": "png"}  # no version: 1
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    for name in ("impulse_noise", "glass_blur", "gaussian_noise"):
        _jpeg(tmp_path / name / "3" / "0" / "0000000.png")
    check_manifest(tmp_path, "foolbox:cifar10", (3, 32, 32), 0)
    assert not (tmp_path / "impulse_noise").exists() and not (tmp_path / "glass_blur").exists()
    assert (tmp_path / "gaussian_noise" / "3" / "0" / "0000000.png").is_file()
    assert json.loads((tmp_path / MANIFEST).read_text()) == {**old, "version": CACHE_VERSION}
    with pytest.raises(ValueError, match="was made for"):  # other differences are still refused
        check_manifest(tmp_path, "foolbox:cifar10", (3, 32, 32), 1)
