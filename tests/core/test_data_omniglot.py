"""Omniglot straight from the official zips: counts, images, pickling and DataLoader workers."""
from __future__ import annotations

import pickle
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch

from ctxsim.data import (
    MPerClassBatchSampler,
    OmniglotZip,
    Preprocess,
    class_disjoint_split,
    eval_transform,
    make_loader,
    omniglot,
    open_dataset,
)
from ctxsim.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def background(omniglot_dir):
    return omniglot(omniglot_dir, "background")


@pytest.fixture(scope="module")
def evaluation(omniglot_dir):
    return omniglot(omniglot_dir, "evaluation")


@pytest.mark.parametrize("split,n_classes,n_alphabets,n_images", [
    ("background", 964, 30, 19280),
    ("evaluation", 659, 20, 13180),
])
def test_counts(request, split, n_classes, n_alphabets, n_images):
    ds = request.getfixturevalue(split)
    assert isinstance(ds, OmniglotZip)
    assert len(ds) == n_images and len(ds.labels) == len(ds.paths) == n_images
    assert ds.num_classes == n_classes and len(ds.class_names) == n_classes
    assert ds.num_super_classes == n_alphabets and len(set(ds.super_labels)) == n_alphabets
    assert sorted(set(ds.labels)) == list(range(n_classes))
    assert set(Counter(ds.labels).values()) == {20}  # 20 drawers per character
    # class name = alphabet/character, super-label = that alphabet
    for i in (0, n_images // 2, n_images - 1):
        alphabet, character = ds.class_names[ds.labels[i]].split("/")
        assert ds.super_class_names[ds.super_labels[i]] == alphabet
        assert ds.paths[i].endswith(f"images_{split}/{alphabet}/{character}/" + ds.paths[i].rsplit("/", 1)[1])


def test_background_and_evaluation_are_disjoint(background, evaluation):
    assert set(background.super_class_names).isdisjoint(evaluation.super_class_names)


def test_image_as_stored(background):
    im = background.load_image(123)
    assert im.size == (105, 105) and im.mode == "L"
    a = np.asarray(im)
    assert set(np.unique(a)) <= {0, 255}
    assert a.mean() > 128  # black strokes on white: kept as stored, not inverted
    x, y = background.with_transform(eval_transform(Preprocess.greyscale()))[123]
    assert x.shape == (1, 28, 28) and y == background.labels[123]


def test_pickle_reopens_zip_lazily(background):
    background.load_image(0)  # opens this process's handle
    assert background._zip is not None
    clone = pickle.loads(pickle.dumps(background))
    assert clone._zip is None and clone.paths == background.paths and clone.labels == background.labels
    assert np.array_equal(np.asarray(clone.load_image(77)), np.asarray(background.load_image(77)))


def test_dataloader_with_workers(background):
    ds = background.with_transform(eval_transform(Preprocess.greyscale()))
    ds.load_image(0)  # a parent handle exists before the workers fork
    sampler = MPerClassBatchSampler(ds.labels, m=4, batch_size=32, num_batches=4, seed=1)
    dl = make_loader(ds, batch_sampler=sampler, num_workers=2)
    got = [(x, y) for x, y in dl]
    assert len(got) == 4
    batches = list(sampler)
    ref = ds.with_transform(eval_transform(Preprocess.greyscale()))
    for (x, y), idx in zip(got, batches):
        assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
        assert y.tolist() == [ds.labels[i] for i in idx]
        assert torch.equal(x[5], ref[idx[5]][0])  # workers read the right bytes


def test_alphabet_holdout_split(background):
    tr, va = class_disjoint_split(background, n_holdout_classes=5, seed=0, by="super")
    assert va.num_super_classes == 5 and tr.num_super_classes == 25
    assert set(tr.super_class_names).isdisjoint(va.super_class_names)
    assert tr.num_classes + va.num_classes == 964 and len(tr) + len(va) == 19280
    again = class_disjoint_split(background, n_holdout_classes=5, seed=0, by="super")[1]
    assert again.super_class_names == va.super_class_names
    assert np.array_equal(np.asarray(va.load_image(3)), np.asarray(again.load_image(3)))


def test_open_dataset_omniglot_and_errors(omniglot_dir, tmp_path):
    splits = open_dataset("omniglot", omniglot_dir)
    assert set(splits) == {"train", "test"} and splits["test"].num_classes == 659
    with pytest.raises(ConfigError):
        omniglot(omniglot_dir, "val")
    with pytest.raises(DataError):
        omniglot(tmp_path)
    junk = tmp_path / "images_background.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="images_background.zip"):
        omniglot(tmp_path)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match="official Omniglot"):
        OmniglotZip(tmp_path / "other.zip")
