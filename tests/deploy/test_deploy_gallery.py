"""Galleries: folder trees and list files; unreadable images are reported and skipped, not fatal."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from ctxsim.data import ImageFolderDataset, ListFileDataset
from ctxsim.deploy import build_index, load_index, open_gallery
from ctxsim.deploy.gallery import load_image
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


def test_list_file_parses_the_same_as_a_dataset_list(tmp_path):
    """Galleries and ListFileDataset read list files with one parser: comments, blank lines, commas, tabs, CRLF."""
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"# header comment\r\nimgs/0.png cat\r\n\r\nimgs/a b.png, dog  # trailing\r\n"
                    b"  imgs/2.png\tcat\t# tab-separated\r\n/abs/3.png bird\r\n")
    gallery = [(it.path, it.label) for it in open_gallery(lst).items]
    dataset = ListFileDataset(lst)
    assert gallery == list(zip(dataset.paths, (dataset.class_names[y] for y in dataset.labels)))
    assert gallery[1] == (str(tmp_path / "imgs" / "a b.png"), "dog") and gallery[3] == ("/abs/3.png", "bird")
    bom = tmp_path / "bom.txt"  # as Notepad saves UTF-8: the byte-order mark is not part of the first path
    bom.write_bytes(b"\xef\xbb\xbfimgs/0.png cat\n")
    assert [it.path for it in open_gallery(bom).items] == ListFileDataset(bom).paths == [str(tmp_path / "imgs/0.png")]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("imgs/caf\xe9.png cat\n".encode("latin-1"))
    for read in (open_gallery, ListFileDataset):  # one-line DataErrors, never a raw UnicodeDecodeError
        with pytest.raises(DataError, match="latin1.txt is not a UTF-8 list file"):
            read(latin1)


@pytest.mark.parametrize("mode", ["LA", "I;16", "I;16B", "I;16L", "I;16N", "1"])
def test_greyscale_modes_decode_like_the_dataset(tmp_path, mode):
    """A greyscale image, in memory or as a file, becomes the same "L" image in a gallery as in a dataset."""
    values = np.arange(48, dtype=np.uint16).reshape(6, 8) * 5
    grey = Image.fromarray(values.astype(np.uint8), "L")
    im = grey.convert(mode) if mode in ("LA", "1") else Image.fromarray(values).convert("I").convert(mode)
    (tmp_path / "c").mkdir()
    # PNG has no little-endian or native 16-bit mode: those are written as "I;16", the same pixels
    (im if mode not in ("I;16L", "I;16N") else Image.fromarray(values)).save(tmp_path / "c" / "x.png")
    from_dataset = ImageFolderDataset(tmp_path).load_image(0)
    for decoded in (load_image(im), load_image(tmp_path / "c" / "x.png")):
        assert decoded.mode == from_dataset.mode == "L", mode
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(from_dataset))
