"""Omniglot: the zip reader (on generated zips in the official layout), the sample shipped in the package
(omniglot-mini: counts, images, names, licence, size, regeneration) and, with $CTXSIM_OMNIGLOT, the full zips."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from ctxsim.config import resolve_config
from ctxsim.data import (
    MPerClassBatchSampler,
    OmniglotArrays,
    OmniglotZip,
    Preprocess,
    class_disjoint_split,
    eval_transform,
    make_loader,
    omniglot,
    omniglot_mini,
    open_dataset,
)
from ctxsim.data.omniglot import MINI, mini_path
from ctxsim.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_omniglot_mini.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_omniglot_mini", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_split(ds, n_classes: int, n_alphabets: int, split: str, size: int) -> None:
    n_images = 20 * n_classes if size == 28 else len(ds)
    assert len(ds) == n_images and len(ds.labels) == len(ds.paths) == n_images
    assert ds.num_classes == n_classes and len(ds.class_names) == n_classes
    assert ds.num_super_classes == n_alphabets and len(set(ds.super_labels)) == n_alphabets
    assert sorted(set(ds.labels)) == list(range(n_classes))
    # class name = alphabet/character, super-label = that alphabet
    for i in (0, n_images // 2, n_images - 1):
        alphabet, character = ds.class_names[ds.labels[i]].split("/")
        assert ds.super_class_names[ds.super_labels[i]] == alphabet
        assert ds.paths[i].endswith(f"images_{split}/{alphabet}/{character}/" + ds.paths[i].rsplit("/", 1)[1])
    im = ds.load_image(n_images // 3)
    assert im.size == (size, size) and im.mode == "L"
    assert np.asarray(im).mean() > 128  # black strokes on white: kept as stored, not inverted


# ------------------------------------------------------------------------------------- the zip reader (fake zips)
@pytest.fixture(scope="module")
def background(fake_omniglot):
    return omniglot(fake_omniglot, "background")


@pytest.fixture(scope="module")
def evaluation(fake_omniglot):
    return omniglot(fake_omniglot, "evaluation")


def test_zip_counts_and_names(background, evaluation):
    assert isinstance(background, OmniglotZip)
    for ds, split, alphabets in ((background, "background", 3), (evaluation, "evaluation", 2)):
        check_split(ds, 4 * alphabets, alphabets, split, 105)
        assert set(Counter(ds.labels).values()) == {5}
    assert set(background.super_class_names).isdisjoint(evaluation.super_class_names)


def test_image_as_stored(background):
    im = background.load_image(12)
    assert im.size == (105, 105) and im.mode == "L"
    a = np.asarray(im)
    assert set(np.unique(a)) <= {0, 255}
    assert a.mean() > 128  # black strokes on white: kept as stored, not inverted
    x, y = background.with_transform(eval_transform(Preprocess.greyscale()))[12]
    assert x.shape == (1, 28, 28) and y == background.labels[12]


def test_fake_zips_are_the_same_in_every_process(fake_omniglot, tmp_path):
    """The fixture's generator is seeded, not hash()-based: another process (another hash seed) writes the same."""
    again = tmp_path / "again"
    code = ("import importlib.util, sys, pathlib; s = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "m.make_fake_omniglot(pathlib.Path(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(REPO / "tests" / "conftest.py"), str(again)], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=300)
    for name in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(fake_omniglot / name) as a, zipfile.ZipFile(again / name) as b:
            assert a.namelist() == b.namelist()
            assert all(a.read(n) == b.read(n) for n in a.namelist())


def test_pickle_reopens_zip_lazily(background):
    background.load_image(0)  # opens this process's handle
    assert background._zip is not None
    clone = pickle.loads(pickle.dumps(background))
    assert clone._zip is None and clone.paths == background.paths and clone.labels == background.labels
    assert np.array_equal(np.asarray(clone.load_image(37)), np.asarray(background.load_image(37)))


def test_dataloader_with_workers(background):
    ds = background.with_transform(eval_transform(Preprocess.greyscale()))
    ds.load_image(0)  # a parent handle exists before the workers fork
    sampler = MPerClassBatchSampler(ds.labels, m=4, batch_size=16, num_batches=4, seed=1)
    dl = make_loader(ds, batch_sampler=sampler, num_workers=2)
    got = [(x, y) for x, y in dl]
    assert len(got) == 4
    batches = list(sampler)
    ref = ds.with_transform(eval_transform(Preprocess.greyscale()))
    for (x, y), idx in zip(got, batches):
        assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
        assert y.tolist() == [ds.labels[i] for i in idx]
        assert torch.equal(x[5], ref[idx[5]][0])  # workers read the right bytes


def test_alphabet_holdout_split(background):
    tr, va = class_disjoint_split(background, n_holdout_classes=1, seed=0, by="super")
    assert va.num_super_classes == 1 and tr.num_super_classes == 2
    assert set(tr.super_class_names).isdisjoint(va.super_class_names)
    assert tr.num_classes + va.num_classes == 12 and len(tr) + len(va) == 60
    again = class_disjoint_split(background, n_holdout_classes=1, seed=0, by="super")[1]
    assert again.super_class_names == va.super_class_names
    assert np.array_equal(np.asarray(va.load_image(3)), np.asarray(again.load_image(3)))


def test_open_dataset_omniglot_and_errors(fake_omniglot, tmp_path):
    splits = open_dataset("omniglot", fake_omniglot)
    assert set(splits) == {"train", "test"} and splits["test"].num_classes == 8
    with pytest.raises(ConfigError):
        omniglot(fake_omniglot, "val")
    with pytest.raises(DataError, match="omniglot-mini"):  # the message names the shipped sample
        omniglot(tmp_path)
    with pytest.raises(ConfigError, match="omniglot-mini"):
        open_dataset("omniglot")
    junk = tmp_path / "images_background.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="images_background.zip"):
        omniglot(tmp_path)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match="official Omniglot"):
        OmniglotZip(tmp_path / "other.zip")


# ------------------------------------------------------------------------------------- the shipped sample
MINI_BACKGROUND = ("Armenian", "Bengali", "Braille", "Cyrillic", "Futurama", "Greek", "Hebrew",
                   "Japanese_(katakana)", "Korean", "Latin")
MINI_EVALUATION = ("Atlantean", "Aurek-Besh", "Ge_ez", "Glagolitic", "Tengwar")


def test_sample_counts_and_names():
    train, test = omniglot_mini("background"), omniglot_mini("evaluation")
    assert isinstance(train, OmniglotArrays) and isinstance(test, OmniglotArrays)
    check_split(train, 331, 10, "background", 28)
    check_split(test, 148, 5, "evaluation", 28)
    assert tuple(train.super_class_names) == MINI_BACKGROUND and tuple(test.super_class_names) == MINI_EVALUATION
    assert set(Counter(test.labels).values()) == {20}  # all 20 drawings of every character
    assert test.paths[0] == "omniglot-mini/images_evaluation/Atlantean/character01/1011_01.png"
    assert len(load_script().ALPHABETS["images_background"]) == 10  # the script names what ships


def test_sample_is_known_by_name_everywhere(tmp_path, monkeypatch):
    splits = open_dataset("omniglot-mini")
    assert set(splits) == {"train", "test"} and splits["test"].num_classes == 148
    assert open_dataset("omniglot_mini", split="train").num_classes == 331
    assert open_dataset("omniglot", MINI)["test"].paths == splits["test"].paths  # --data omniglot-mini
    assert len(omniglot(MINI, "evaluation")) == 2960
    assert len(omniglot(mini_path(), "background")) == 6620  # the .npz itself as a root
    cfg = resolve_config("omniglot", overrides={"data": {"root": MINI}})
    from ctxsim.data.pipeline import open_eval_dataset

    assert open_eval_dataset(cfg, cfg.preprocess).num_classes == 148
    (tmp_path / MINI).mkdir()  # a folder of that name, where one exists, wins over the shipped sample
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="neither"):
        omniglot(MINI, "evaluation")


def test_sample_pickles_only_its_split():
    test = omniglot_mini("evaluation", transform=eval_transform(Preprocess.greyscale()))
    clone = pickle.loads(pickle.dumps(test))
    assert clone._images.shape == (2960, 28, 28)
    x, y = clone[100]
    assert x.shape == (1, 28, 28) and y == test.labels[100]
    assert torch.equal(x, test[100][0])


def test_sample_ships_as_package_data_with_licence_and_provenance():
    folder = mini_path().parent
    assert mini_path().stat().st_size <= 3_000_000
    assert "MIT License" in (folder / "LICENSE").read_text() and "Brenden Lake" in (folder / "LICENSE").read_text()
    readme = (folder / "README.md").read_text()
    for what in ("brendenlake/omniglot", "scripts/make_omniglot_mini.py", *MINI_BACKGROUND, *MINI_EVALUATION):
        assert what in readme, what
    digest = hashlib.sha256(mini_path().read_bytes()).hexdigest()
    assert digest in readme  # the README names the exact bytes it describes
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"omniglot_mini/*.npz", "omniglot_mini/LICENSE", "omniglot_mini/README.md"} <= set(data["ctxsim.data"])


def test_sample_pixels_are_the_scripts_reduction():
    """Each shipped drawing is the 4x4 area average of a 1-bit drawing (padded to 112): 17 grey levels."""
    images = np.load(mini_path())["images"]
    levels = np.unique(images)
    assert set(levels.tolist()) <= {(255 * k + 8) // 16 for k in range(17)} and levels[0] == 0 and levels[-1] == 255
    script = load_script()
    white = np.ones((105, 105), bool)
    white[40:60, 50:53] = False  # a stroke
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(white).save(buf, "PNG")
    small = script.reduce_drawing(buf.getvalue())
    assert small.shape == (28, 28) and small.dtype == np.uint8 and small.min() < 128 and small[0, 0] == 255
    packed = script.pack(images[:3], np.array([b"a", b"b", b"c"]))
    assert packed == script.pack(images[:3], np.array([b"a", b"b", b"c"]))  # no timestamps in the bytes


@pytest.mark.slow
def test_script_regenerates_the_shipped_sample_byte_for_byte(omniglot_full):
    assert load_script().build(omniglot_full) == mini_path().read_bytes()


# ------------------------------------------------------------------------------------- the full official zips
@pytest.mark.slow
@pytest.mark.parametrize("split,n_classes,n_alphabets,n_images", [
    ("background", 964, 30, 19280),
    ("evaluation", 659, 20, 13180),
])
def test_full_counts(omniglot_full, split, n_classes, n_alphabets, n_images):
    ds = omniglot(omniglot_full, split)
    assert isinstance(ds, OmniglotZip) and len(ds) == n_images
    check_split(ds, n_classes, n_alphabets, split, 105)
    assert set(Counter(ds.labels).values()) == {20}  # 20 drawers per character
