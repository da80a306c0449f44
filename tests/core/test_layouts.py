"""Benchmark layouts on tiny fake trees: classes, counts and splits; and the open_dataset dispatcher."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxsim.data import (
    KNOWN_DATASETS,
    HierarchicalBatchSampler,
    cars196,
    cub200,
    inat2021,
    inat_supercategory,
    inshop,
    open_dataset,
    sop,
)
from ctxsim.errors import ConfigError, DataError


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (value % 256, 3, 4)).save(path, format="PNG")  # lossless whatever the name


def _pixel(ds, i):
    return ds.load_image(i).getpixel((0, 0))[0]


def _assert_contiguous(ds):
    assert sorted(set(ds.labels)) == list(range(ds.num_classes)) == list(range(len(ds.class_names)))


# ---------------------------------------------------------------------- CUB
def _fake_cub(tmp_path, classes=(1, 2, 100, 101, 150, 200), per=2):
    base = tmp_path / "CUB_200_2011"
    images, labels = [], []
    iid = 0
    for c in classes:
        for k in range(per):
            iid += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
            _img(base / "images" / rel, c)
            images.append(f"{iid} {rel}")
            labels.append(f"{iid} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return tmp_path


def test_cub200(tmp_path):
    root = _fake_cub(tmp_path)
    train, test = cub200(root)  # also finds root/CUB_200_2011
    assert train.class_names == ["001.Bird_1", "002.Bird_2", "100.Bird_100"]
    assert test.class_names == ["101.Bird_101", "150.Bird_150", "200.Bird_200"]
    assert len(train) == len(test) == 6
    for ds in (train, test):
        _assert_contiguous(ds)
        for i in range(len(ds)):  # image content matches its class number
            assert _pixel(ds, i) == int(ds.class_names[ds.labels[i]][:3])
    assert cub200(root / "CUB_200_2011")[0].paths == train.paths
    (root / "CUB_200_2011" / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="no class"):
        cub200(root)


# ---------------------------------------------------------------------- Cars196
def _check_cars(train, test, train_numbers=(1, 98), test_numbers=(99, 196), per=2):
    assert train.num_classes == len(train_numbers) and test.num_classes == len(test_numbers)
    assert len(train) == per * len(train_numbers) and len(test) == per * len(test_numbers)
    for ds, numbers in ((train, train_numbers), (test, test_numbers)):
        _assert_contiguous(ds)
        assert sorted({_pixel(ds, i) for i in range(len(ds))}) == sorted(numbers)
        for i in range(len(ds)):  # same label <=> same class number
            assert Counter(_pixel(ds, j) for j in range(len(ds)) if ds.labels[j] == ds.labels[i]) == \
                Counter({_pixel(ds, i): per})


def test_cars196_class_folders(tmp_path):
    for c in (1, 98, 99, 196):
        for k in range(2):
            _img(tmp_path / f"{c:03d}_Make_{c}" / f"{k}.jpg", c)
    train, test = cars196(tmp_path)
    _check_cars(train, test)
    assert train.class_names == ["001_Make_1", "098_Make_98"]


def test_cars196_list_file(tmp_path):
    lines = []
    for c in (196, 1, 99, 98):
        for k in range(2):
            _img(tmp_path / "car_ims" / f"{c}_{k}.jpg", c)
            lines.append(f"car_ims/{c}_{k}.jpg {c}")
    (tmp_path / "cars.txt").write_text("\n".join(lines) + "\n")
    train, test = cars196(tmp_path / "cars.txt")
    _check_cars(train, test)
    assert train.class_names == ["1", "98"] and test.class_names == ["99", "196"]


def test_cars196_paper_split_files(tmp_path):
    for name, classes in (("cars196_train.txt", (1, 98)), ("cars196_test.txt", (99, 196))):
        rows = ["image_id class_id super_class_id path"]
        for c in classes:
            for k in range(2):
                _img(tmp_path / "car_ims" / f"{c}_{k}.jpg", c)
                rows.append(f"{len(rows) - 1} {c} 1 car_ims/{c}_{k}.jpg")
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    train, test = cars196(tmp_path)
    _check_cars(train, test)
    assert train.super_labels is None  # the paper's files carry a dummy super-class


def test_cars196_annos_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rows = []
    for c in (1, 98, 99, 196):
        for k in range(2):
            rel = f"car_ims/{c:03d}{k}.jpg"
            _img(tmp_path / rel, c)
            rows.append((rel, 0, 0, 5, 5, c, k))
    dt = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
          ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    annos = np.array([rows], dtype=dt)
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Car Model {c + 1}"
    scipy_io.savemat(tmp_path / "cars_annos.mat", {"annotations": annos, "class_names": names})
    train, test = cars196(tmp_path)
    _check_cars(train, test)
    assert train.class_names == ["Car Model 1", "Car Model 98"]


def test_cars196_needs_both_sides(tmp_path):
    for name in ("alpha", "beta", "gamma"):
        _img(tmp_path / name / "0.jpg")
    with pytest.raises(DataError, match="both sides"):
        cars196(tmp_path)


# ---------------------------------------------------------------------- SOP
def test_sop(tmp_path):
    header = "image_id class_id super_class_id path"
    spec = {"train": [(1, 1, "bicycle_final"), (2, 1, "bicycle_final"), (3, 2, "chair_final"),
                      (4, 2, "chair_final")],
            "test": [(10, 1, "bicycle_final"), (11, 2, "chair_final"), (12, 3, "mug_final")]}
    for split, classes in spec.items():
        rows = [header]
        for cid, sid, folder in classes:
            for k in range(3):
                rel = f"{folder}/{cid}_{k}.JPG"
                _img(tmp_path / rel, cid)
                rows.append(f"{len(rows)} {cid} {sid} {rel}")
        (tmp_path / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")
    train, test = sop(tmp_path)
    assert train.class_names == ["1", "2", "3", "4"] and test.class_names == ["10", "11", "12"]
    assert train.super_class_names == ["1", "2"] and test.super_class_names == ["1", "2", "3"]
    assert len(train) == 12 and len(test) == 9
    for ds in (train, test):
        _assert_contiguous(ds)
        for i in range(len(ds)):
            assert _pixel(ds, i) == int(ds.class_names[ds.labels[i]])
    sid = {1: "1", 2: "1", 3: "2", 4: "2"}
    assert all(train.super_class_names[s] == sid[int(train.class_names[y])]
               for y, s in zip(train.labels, train.super_labels))
    hs = HierarchicalBatchSampler(train.labels, train.super_labels, batch_size=8, m=2, num_batches=3)
    assert all({train.super_labels[i] for i in b} == {0, 1} for b in hs)
    (tmp_path / "Ebay_test.txt").write_text("id class path\n")
    with pytest.raises(DataError, match="header"):
        sop(tmp_path)


# ---------------------------------------------------------------------- In-Shop
def test_inshop(tmp_path):
    rows = []
    spec = [("id_00000001", "train", 2), ("id_00000002", "train", 3),
            ("id_00000007", "query", 1), ("id_00000007", "gallery", 2),
            ("id_00000003", "query", 2), ("id_00000003", "gallery", 1)]
    for item, status, n in spec:
        for k in range(n):
            name = f"img/WOMEN/Dresses/{item}/{status}_{k}.jpg"
            _img(tmp_path / "Img" / name, int(item[-1]))
            rows.append(f"{name} {item} {status}")
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    train, query, gallery = inshop(tmp_path)
    assert train.class_names == ["id_00000001", "id_00000002"] and len(train) == 5
    assert query.class_names == gallery.class_names == ["id_00000003", "id_00000007"]
    assert len(query) == 3 and len(gallery) == 3
    for ds in (train, query, gallery):
        _assert_contiguous(ds)
        for i in range(len(ds)):
            assert _pixel(ds, i) == int(ds.class_names[ds.labels[i]][-1])
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(
        "99\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="announces 99"):
        inshop(tmp_path)


# ---------------------------------------------------------------------- iNaturalist 2021
_INAT = {
    "Plants": ["Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_{}"] * 4,
    "Birds": ["Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_{}"] * 3,
    "Mollusks": ["Animalia_Mollusca_Gastropoda_Stylommatophora_Helicidae_Cornu_{}"] * 2,
    "Animalia": ["Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_{}"] * 2,
}


def _fake_inat(tmp_path, per=2):
    base = tmp_path / "train_mini"
    n = 0
    names = {}
    for sup, patterns in _INAT.items():
        for k, pat in enumerate(patterns):
            folder = f"{n:05d}_" + pat.format(f"sp{k}")
            names[folder] = sup
            for j in range(per):
                _img(base / folder / f"{j}.jpg", n)
            n += 1
    return names


def test_inat_supercategory():
    assert inat_supercategory("00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris") \
        == "Animalia"
    assert inat_supercategory("03111_Animalia_Chordata_Actinopterygii_Perciformes_Centrarchidae_Lepomis_gibbosus") \
        == "Ray-finned Fishes"
    assert inat_supercategory("05729_Plantae_Tracheophyta_Liliopsida_Asparagales_Orchidaceae_Ophrys_apifera") \
        == "Plants"
    with pytest.raises(DataError):
        inat_supercategory("Rosa_rubiginosa")


def test_inat2021_split(tmp_path):
    names = _fake_inat(tmp_path)
    train, test = inat2021(tmp_path)
    assert set(train.class_names).isdisjoint(test.class_names)
    assert set(train.class_names) | set(test.class_names) == set(names)
    assert len(train) + len(test) == 2 * len(names)
    for ds in (train, test):
        _assert_contiguous(ds)
        for y, s in zip(ds.labels, ds.super_labels):
            assert ds.super_class_names[s] == names[ds.class_names[y]]
    # half of each super-category's species in test (train keeps the odd one)
    per_sup = Counter(names.values())
    test_sup = Counter(names[c] for c in test.class_names)
    assert test_sup == Counter({s: n // 2 for s, n in per_sup.items()})
    again = inat2021(tmp_path / "train_mini")
    assert again[1].class_names == test.class_names and again[0].paths == train.paths
    splits = {tuple(inat2021(tmp_path, seed=s)[1].class_names) for s in range(6)}
    assert len(splits) > 1


def test_inat2021_paper_split_files(tmp_path):
    names = _fake_inat(tmp_path)
    folders = sorted(names)
    tr_lines = [f"{f}/{j}.jpg,0,{int(f[:5])}" for f in folders[::2] for j in range(2)]
    te_lines = [f"{f}/{j}.jpg,0,{int(f[:5])}" for f in folders[1::2] for j in range(2)]
    (tmp_path / "iNaturalist_train.txt").write_text("\n".join(tr_lines) + "\n")
    (tmp_path / "iNaturalist_test.txt").write_text("\n".join(te_lines) + "\n")
    train, test = inat2021(tmp_path)
    assert train.class_names == folders[::2] and test.class_names == folders[1::2]
    assert _pixel(test, 0) == int(folders[1][:5])


# ---------------------------------------------------------------------- dispatcher
def test_open_dataset(tmp_path):
    with pytest.raises(ConfigError, match="known: .*cub200.*omniglot"):
        open_dataset("imagenet", tmp_path)
    assert {"cub200", "cars196", "sop", "inshop", "inat2021", "omniglot", "digits", "folder", "list"} \
        <= set(KNOWN_DATASETS)
    d = open_dataset("digits")
    assert d["train"].num_classes == 5 and len(d["all"]) == 1797
    assert open_dataset("digits", split="test").class_names[0] == "5"
    with pytest.raises(ConfigError, match="splits"):
        open_dataset("digits", split="val")
    with pytest.raises(ConfigError, match="root"):
        open_dataset("cub")

    _fake_cub(tmp_path / "cub")
    assert open_dataset("CUB", tmp_path / "cub", split="test").num_classes == 3

    for split in ("train", "test"):
        for c in ("a", "b"):
            _img(tmp_path / "tree" / split / f"{split}{c}" / "0.png")
    f = open_dataset("folder", tmp_path / "tree")
    assert set(f) == {"train", "test"} and f["test"].class_names == ["testa", "testb"]
    flat = open_dataset("folder", tmp_path / "tree" / "train", on_error="skip")
    assert set(flat) == {"all"} and flat["all"].on_error == "skip"

    (tmp_path / "l.txt").write_text("tree/train/traina/0.png x\ntree/test/testb/0.png y\n")
    lst = open_dataset("list", tmp_path / "l.txt", split="all")
    assert lst.class_names == ["x", "y"] and lst.load_image(1).size == (6, 5)
