"""Galleries: folder trees and list files; unreadable images are reported and skipped, not fatal."""
from __future__ import annotations

import shutil

import pytest

from ctxsim.deploy import build_index, load_index, open_gallery
from ctxsim.errors import DataError


def test_folder_tree_labels(gallery_dir):
    g = open_gallery(gallery_dir)
    classes = sorted(p.name for p in gallery_dir.iterdir())
    assert len(g) == 20 * len(classes)
    assert sorted(set(g.labels)) == classes
    assert all(it.label == it.path.split("/")[-2] for it in g.items)


def test_list_file(tmp_path, gallery_dir):
    files = sorted(gallery_dir.rglob("*.png"))[:3]
    (tmp_path / "sub").mkdir()
    shutil.copy(files[2], tmp_path / "sub" / "c d.png")
    lst = tmp_path / "gallery.txt"
    lst.write_text(f"# comment\n{files[0]} cat\n\n{files[1]}\nsub/c d.png, dog  # trailing comment\n")
    g = open_gallery(lst)
    assert [(it.path, it.label) for it in g.items] == [
        (str(files[0]), "cat"), (str(files[1]), None), (str(tmp_path / "sub" / "c d.png"), "dog")]
    lst.write_text("a b c d\n")
    with pytest.raises(DataError, match="expected 'path \\[label\\]'"):
        open_gallery(lst)
    with pytest.raises(DataError, match="not found"):
        open_gallery(tmp_path / "missing")


def test_unreadable_images_are_reported_and_skipped(tmp_path, gallery_dir, run_dir, caplog):
    g = tmp_path / "g"
    shutil.copytree(gallery_dir, g)
    cls = sorted(p for p in g.iterdir())[0]
    (cls / "zz_truncated.png").write_bytes((cls / sorted(p.name for p in cls.iterdir())[0]).read_bytes()[:60])
    (cls / "zz_text.jpg").write_text("not an image")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([str(p) for p in sorted(cls.glob("*.png"))] + [str(tmp_path / "gone.png")]) + "\n")
    with caplog.at_level("WARNING", logger="ctxsim"):
        info = build_index(g, run_dir, tmp_path / "idx")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 2 unreadable image(s) of 242")  # one line
    bad = dict(info.skipped)
    assert set(bad) == {str(cls / "zz_truncated.png"), str(cls / "zz_text.jpg")}
    assert all(reason for reason in bad.values())
    assert info.count == 20 * len(list(gallery_dir.iterdir()))
    assert all("zz_" not in it.path for it in load_index(tmp_path / "idx").items)
    info2 = build_index(lst, run_dir, tmp_path / "idx2")
    assert [p for p, _ in info2.skipped] == [str(cls / "zz_truncated.png"), str(tmp_path / "gone.png")]
    assert "not found" in info2.skipped[1][1] and info2.count == 20
    empty = tmp_path / "empty.txt"
    empty.write_text(f"{cls / 'zz_text.jpg'}\n")
    with pytest.raises(DataError, match="no readable images"):
        build_index(empty, run_dir, tmp_path / "idx3")
