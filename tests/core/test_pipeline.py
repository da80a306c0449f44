"""Config -> data: plain folders get a class-disjoint test split, label noise flips the asked fraction."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ctxsim.config import resolve_config
from ctxsim.data.pipeline import build_datasets


def make_tree(root, classes=6, per_class=5):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(d / f"{i}.png")


def test_plain_folder_holds_out_whole_classes(tmp_path):
    make_tree(tmp_path / "data")
    cfg = resolve_config("digits-demo", overrides={"data": {"dataset": "folder", "root": str(tmp_path / "data"),
                                                            "m": 2, "batch_size": 4, "test_classes": 0.5}})
    data = build_datasets(cfg)
    train_names = set(data.train.class_names)
    test_names = set(data.test.class_names)
    assert len(train_names) == 3 and len(test_names) == 3 and not train_names & test_names
    x, _y = data.test[0]
    assert tuple(x.shape) == (1, 32, 32)  # eval transform of the recipe (32 px greyscale)


def test_label_noise_flips_about_the_asked_fraction():
    cfg = resolve_config("digits-demo", overrides={"data": {"label_noise": 0.2}})
    clean = build_datasets(resolve_config("digits-demo")).train
    noisy = build_datasets(cfg).train
    changed = np.mean(np.array(clean.labels) != np.array(noisy.labels))
    # 20% are redrawn uniformly over 5 classes, so ~4/5 of those actually change: 16% +- sampling noise
    assert 0.12 < changed < 0.20
    assert noisy.paths == clean.paths


def test_validation_split_holds_out_whole_super_classes(omniglot_dir):
    cfg = resolve_config("omniglot", overrides={"data": {"root": str(omniglot_dir), "val_classes": 0.2}})
    data = build_datasets(cfg)
    assert set(data.train.super_class_names).isdisjoint(data.val.super_class_names)
    assert data.val.num_super_classes == 2 and data.train.num_super_classes == 8  # 20% of the sample's 10 alphabets
    assert set(data.eval_sets()) == {"val", "test"}
