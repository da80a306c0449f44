"""Datasets (folder, list file, subset, splits, bad images), digits and transforms."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ctxsim.data import (
    DigitsDataset,
    ImageDataset,
    ImageFolderDataset,
    ListFileDataset,
    Preprocess,
    Record,
    class_disjoint_split,
    digits,
    eval_transform,
    make_loader,
    subset,
    super_class_disjoint_split,
    train_transform,
)
from ctxsim.errors import ConfigError, DataError


def _img(path, value=128, size=(12, 10), mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "1") else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture()
def tree(tmp_path):
    """root/<class>/...: 'b' 3 images, 'a' 2 (one nested), 'c10' and 'c2' 1 each, plus junk to ignore."""
    root = tmp_path / "tree"
    _img(root / "b" / "1.png", 10)
    _img(root / "b" / "2.jpg", 20, mode="RGB")
    _img(root / "b" / "10.png", 30)
    _img(root / "a" / "x.png", 40)
    _img(root / "a" / "sub" / "y.png", 50)
    _img(root / "c10" / "z.png", 60)
    _img(root / "c2" / "w.png", 70)
    (root / "a" / "notes.txt").write_text("not an image")
    _img(root / "a" / ".hidden.png", 80)
    (root / "empty").mkdir()
    return root


# ---------------------------------------------------------------------- folder / list readers
def test_image_folder_classes_order_and_labels(tree):
    ds = ImageFolderDataset(tree)
    assert ds.class_names == ["a", "b", "c2", "c10"]  # natural order; 'empty' has no images
    assert ds.num_classes == 4 and len(ds) == 7
    assert ds.super_labels is None
    # contiguous labels, sorted paths inside a class (natural: 1, 2, 10)
    assert sorted(set(ds.labels)) == [0, 1, 2, 3]
    b = [p.split("/")[-1] for p, y in zip(ds.paths, ds.labels) if y == 1]
    assert b == ["1.png", "2.jpg", "10.png"]
    assert not any(p.endswith((".txt", ".hidden.png")) for p in ds.paths)
    # determinism: a second scan gives identical paths and labels
    ds2 = ImageFolderDataset(tree)
    assert ds2.paths == ds.paths and ds2.labels == ds.labels


def test_getitem_transform_and_modes(tree):
    ds = ImageFolderDataset(tree)
    i_rgb = next(i for i, p in enumerate(ds.paths) if p.endswith("2.jpg"))
    assert ds.load_image(i_rgb).mode == "RGB"
    assert ds.load_image(0).mode == "L" and ds.load_image(0).size == (12, 10)
    img, y = ds[0]
    assert isinstance(img, Image.Image) and y == ds.labels[0]
    ds.transform = lambda im: np.asarray(im).shape
    assert ds[0] == ((10, 12), ds.labels[0])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bilevel_and_rgba_images_normalised(tmp_path):
    _img(tmp_path / "k" / "a.png", 1, mode="1")
    Image.new("RGBA", (4, 4), (1, 2, 3, 4)).save(tmp_path / "k" / "b.png")
    Image.new("I;16", (4, 4), 100).save(tmp_path / "k" / "c.png")
    ds = ImageFolderDataset(tmp_path)
    assert [ds.load_image(i).mode for i in range(3)] == ["L", "RGB", "L"]
    assert np.asarray(ds.load_image(0)).max() == 255  # bilevel white stays white, no inversion


def test_empty_folder_is_data_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")


def test_list_file_formats(tmp_path):
    for i in range(4):
        _img(tmp_path / "imgs" / f"{i}.png", 10 * i)
    other = tmp_path / "elsewhere"
    _img(other / "abs.png")
    lst = tmp_path / "list.txt"
    lst.write_text(
        "# a comment\n"
        "imgs/0.png 10 animal\n"
        "\n"
        "imgs/1.png, 2, plant   \n"
        f"{other / 'abs.png'}\t2\tplant  # trailing comment\n"
        "imgs/3.png   10 animal\n"
    )
    ds = ListFileDataset(lst)
    assert ds.class_names == ["2", "10"]  # numeric labels ordered numerically
    assert ds.labels == [1, 0, 0, 1]
    assert ds.super_class_names == ["animal", "plant"] and ds.super_labels == [0, 1, 1, 0]
    assert ds.paths[0] == str(tmp_path / "imgs" / "0.png")
    assert ds.paths[2] == str(other / "abs.png")
    assert ds.load_image(3).getpixel((0, 0)) == 30

    # root overrides the list file's folder
    lst2 = tmp_path / "sub" / "l.txt"
    lst2.parent.mkdir()
    lst2.write_text("0.png a\n1.png b\n")
    assert ListFileDataset(lst2, root=tmp_path / "imgs").load_image(1).getpixel((0, 0)) == 10

    bad = tmp_path / "bad.txt"
    bad.write_text("imgs/0.png 1\nimgs/1.png\n")
    with pytest.raises(DataError, match=r"bad.txt:2"):
        ListFileDataset(bad)
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("imgs/0.png 1 s\nimgs/1.png 2\n")
    with pytest.raises(DataError, match="super-class"):
        ListFileDataset(mixed)


# ---------------------------------------------------------------------- subset and splits
def _toy(n_classes=10, per=3, supers=None):
    recs = [
        Record(f"/x/{c}/{k}.png", f"cls{c}", None if supers is None else f"s{c % supers}")
        for c in range(n_classes) for k in range(per)
    ]
    return ImageDataset(recs)


def test_subset_remaps_labels():
    ds = _toy(6, 2, supers=3)
    sub = subset(ds, [11, 4, 5, 10])  # classes cls5, cls2, cls2, cls5
    assert sub.class_names == ["cls2", "cls5"]
    assert sub.labels == [1, 0, 0, 1]
    assert sub.paths == [ds.paths[i] for i in (11, 4, 5, 10)]
    assert sub.super_class_names == ["s2"] and sub.super_labels == [0, 0, 0, 0]
    assert type(sub) is type(ds)
    with pytest.raises(ConfigError):
        subset(ds, [99])


@pytest.mark.parametrize("kw", [dict(holdout_fraction=0.3), dict(n_holdout_classes=4)])
def test_class_disjoint_split(kw):
    ds = _toy(10, 3)
    tr, ho = class_disjoint_split(ds, seed=1, **kw)
    assert set(tr.class_names).isdisjoint(ho.class_names)
    assert set(tr.class_names) | set(ho.class_names) == set(ds.class_names)
    assert len(tr) + len(ho) == len(ds) and set(tr.paths).isdisjoint(ho.paths)
    assert ho.num_classes == (3 if "holdout_fraction" in kw else 4)
    for d in (tr, ho):
        assert sorted(set(d.labels)) == list(range(d.num_classes))
        # each path keeps its class name
        for p, y in zip(d.paths, d.labels):
            assert p.split("/")[2] == d.class_names[y][3:]
    tr2, ho2 = class_disjoint_split(ds, seed=1, **kw)
    assert (tr2.paths, ho2.paths) == (tr.paths, ho.paths)
    others = {tuple(class_disjoint_split(ds, seed=s, **kw)[1].class_names) for s in range(2, 8)}
    assert len(others | {tuple(ho.class_names)}) > 1  # the seed matters


def test_super_class_disjoint_split():
    ds = _toy(12, 2, supers=4)
    tr, ho = super_class_disjoint_split(ds, n_holdout_super_classes=1, seed=0)
    assert ho.num_super_classes == 1 and tr.num_super_classes == 3
    assert set(tr.super_class_names).isdisjoint(ho.super_class_names)
    assert ho.num_classes == 3 and len(ho) == 6
    with pytest.raises(ConfigError, match="super_labels"):
        class_disjoint_split(_toy(), 0.5, by="super")


def test_split_errors():
    ds = _toy(5, 2)
    with pytest.raises(ConfigError):
        class_disjoint_split(ds)
    with pytest.raises(ConfigError):
        class_disjoint_split(ds, 0.5, 2)
    with pytest.raises(ConfigError):
        class_disjoint_split(ds, 1.0)
    with pytest.raises(ConfigError):
        class_disjoint_split(ds, n_holdout_classes=5)
    with pytest.raises(ConfigError):
        class_disjoint_split(_toy(1, 3), 0.5)


# ---------------------------------------------------------------------- bad images
@pytest.fixture()
def corrupt_tree(tmp_path):
    root = tmp_path / "c"
    for k in range(3):
        _img(root / "good" / f"{k}.png", 50 + k)
    _img(root / "mixed" / "0.png", 100)
    bad = root / "mixed" / "1.png"
    bad.write_bytes(b"\x89PNG garbage, definitely not an image" * 3)
    _img(root / "mixed" / "2.png", 102)
    return root, bad


def test_corrupt_image_raises_data_error_naming_path(corrupt_tree):
    root, bad = corrupt_tree
    ds = ImageFolderDataset(root)
    i = ds.paths.index(str(bad))
    with pytest.raises(DataError) as ei:
        ds[i]
    assert str(bad) in str(ei.value)
    with pytest.raises(DataError, match="1.png"):
        ds.load_image(i)
    assert ds.skipped == []


def test_truncated_and_missing_images(tmp_path):
    p = _img(tmp_path / "k" / "t.png", size=(64, 64))
    good = p.read_bytes()
    (tmp_path / "k" / "t.png").write_bytes(good[: len(good) // 2])
    _img(tmp_path / "k" / "ok.png")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="t.png"):
        ds.load_image(ds.paths.index(str(p)))
    gone = ImageDataset([Record(str(tmp_path / "nope.png"), "a")])
    with pytest.raises(DataError, match="nope.png"):
        gone[0]


def test_corrupt_image_skip_policy(corrupt_tree, caplog):
    root, bad = corrupt_tree
    ds = ImageFolderDataset(root, on_error="skip")
    i = ds.paths.index(str(bad))
    with caplog.at_level(logging.WARNING, logger="ctxsim.data.datasets"):
        img, y = ds[i]
    assert y == ds.labels[i] == ds.class_names.index("mixed")
    assert img.getpixel((0, 0)) == 102  # the next item of the same class
    assert ds.skipped == [str(bad)]
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    ds[i]
    assert ds.skipped == [str(bad)]  # counted once
    # every good item is unaffected
    assert [ds[j][0].getpixel((0, 0)) for j in range(len(ds)) if j != i] == [50, 51, 52, 100, 102]


def test_skip_whole_class_unreadable_raises(tmp_path):
    (tmp_path / "bad").mkdir()
    for k in range(2):
        (tmp_path / "bad" / f"{k}.png").write_bytes(b"nope")
    _img(tmp_path / "good" / "0.png")
    ds = ImageFolderDataset(tmp_path, on_error="skip")
    with pytest.raises(DataError, match="every image of class 'bad'"):
        ds[0]
    assert len(ds.skipped) == 2
    with pytest.raises(ConfigError):
        ImageFolderDataset(tmp_path, on_error="ignore")


def test_decompression_bomb_is_data_error(tmp_path, monkeypatch):
    _img(tmp_path / "k" / "big.png", size=(100, 100))
    ds = ImageFolderDataset(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px > 2x limit -> DecompressionBombError
    with pytest.raises(DataError, match="big.png"):
        ds.load_image(0)
    assert Image.MAX_IMAGE_PIXELS is not None


# ---------------------------------------------------------------------- digits
def test_digits_splits():
    tr, te, al = digits("train"), digits("test"), DigitsDataset("all")
    assert len(al) == 1797 and len(tr) + len(te) == 1797
    assert tr.class_names == ["0", "1", "2", "3", "4"] and te.class_names == ["5", "6", "7", "8", "9"]
    assert tr.num_classes == te.num_classes == 5 and al.num_classes == 10
    assert sorted(set(tr.labels)) == sorted(set(te.labels)) == [0, 1, 2, 3, 4]
    assert set(tr.paths).isdisjoint(te.paths) and set(tr.paths) | set(te.paths) == set(al.paths)
    from sklearn.datasets import load_digits

    d = load_digits()
    # label and pixels of each item match sklearn (upscaled by nearest-neighbour blocks)
    for ds in (tr, te):
        for i in (0, 7, len(ds) - 1):
            k = int(ds.paths[i].split("/")[-1])
            assert ds.class_names[ds.labels[i]] == str(d.target[k])
            im = ds.load_image(i)
            assert im.mode == "L" and im.size == (32, 32)
            a = np.asarray(im)
            assert np.array_equal(a[::4, ::4], np.rint(d.images[k] * 255 / 16).astype(np.uint8))
            assert np.array_equal(a[1::4, 3::4], a[::4, ::4])
    assert pickle.loads(pickle.dumps(te)).load_image(3) == te.load_image(3)
    with pytest.raises(ConfigError):
        digits("val")


# ---------------------------------------------------------------------- transforms
def test_preprocess_roundtrip_and_validation():
    p = Preprocess.imagenet()
    assert p.to_dict() == {"input_size": 224, "resize_size": 256, "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "channels": "RGB", "interpolation": "bilinear"}
    assert Preprocess.from_dict(p.to_dict()) == p
    g = Preprocess.greyscale()
    assert (g.channels, g.input_size, g.resize_size, g.mean, g.std) == ("L", 28, 28, (0.5,), (0.5,))
    with pytest.raises(ConfigError):
        Preprocess(28, 28, (0.5,), (0.5,), "RGB")
    with pytest.raises(ConfigError):
        Preprocess(32, 28, (0.5,), (0.5,), "L")
    with pytest.raises(ConfigError):
        Preprocess.from_dict({**p.to_dict(), "colour": 1})
    with pytest.raises(ConfigError):
        Preprocess(28, 28, (0.5,), (0.0,), "L")


def test_eval_transform_shapes_and_normalisation():
    p = Preprocess(4, 6, (0.2, 0.4, 0.6), (0.5, 0.25, 0.1), "RGB", "nearest")
    t = eval_transform(p)
    x = t(Image.new("L", (12, 9), 51))  # greyscale -> RGB, shorter side 9 -> 6, crop 4
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    v = 51 / 255
    expect = torch.tensor([(v - 0.2) / 0.5, (v - 0.4) / 0.25, (v - 0.6) / 0.1])
    assert torch.allclose(x.mean(dim=(1, 2)), expect, atol=1e-5)
    xl = eval_transform(Preprocess.greyscale(8, 10))(Image.new("RGB", (30, 20), (255, 255, 255)))
    assert xl.shape == (1, 8, 8) and torch.allclose(xl, torch.ones_like(xl))
    xb = eval_transform(Preprocess.greyscale(8, 8))(Image.new("L", (16, 16), 0))
    assert torch.allclose(xb, -torch.ones_like(xb))  # black stays black: no inversion
    # eval is deterministic
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    assert torch.equal(t(img), t(img))


def test_train_transform_shapes_and_randomness():
    p = Preprocess.imagenet(32, 36)
    t = train_transform(p, scale=(0.2, 1.0))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    torch.manual_seed(0)
    xs = [t(img) for _ in range(4)]
    assert all(x.shape == (3, 32, 32) for x in xs)
    assert not all(torch.equal(xs[0], x) for x in xs[1:])
    assert train_transform(Preprocess.greyscale())(img).shape == (1, 28, 28)
    with pytest.raises(ConfigError):
        train_transform(p, scale=(0.5, 0.1))
    pickle.dumps(t)  # DataLoader workers


def test_make_loader_plain_and_with_sampler():
    from ctxsim.data import MPerClassBatchSampler

    ds = digits("test").with_transform(eval_transform(Preprocess.greyscale(16, 16)))
    dl = make_loader(ds, batch_size=10, shuffle=True, seed=3)
    x, y = next(iter(dl))
    assert x.shape == (10, 1, 16, 16) and y.shape == (10,)
    assert not dl.pin_memory and dl.num_workers == 0
    again = next(iter(make_loader(ds, batch_size=10, shuffle=True, seed=3)))[1]
    assert torch.equal(y, again)
    bs = MPerClassBatchSampler(ds.labels, m=4, batch_size=12, num_batches=3)
    batches = list(make_loader(ds, batch_sampler=bs))
    assert len(batches) == 3 and all(b[0].shape == (12, 1, 16, 16) for b in batches)
    assert all(len(set(b[1].tolist())) == 3 for b in batches)


def test_a_folder_named_like_an_image_is_data_error(tmp_path):
    _img(tmp_path / "k" / "ok.png")
    ds = ImageDataset([Record(str(tmp_path / "k"), "a")])
    with pytest.raises(DataError, match="not an image file \\(a folder\\)"):
        ds.load_image(0)
