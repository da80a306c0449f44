"""Bounded image decoding (ctxsim.data.limits): every reader refuses an image over the limits from its header."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from ctxsim.data.limits import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, check_image_size, image_limits
from ctxsim.errors import ConfigError, DataError, ImageRefused, ImageTooLarge


def _png(w: int, h: int, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail the test if any image's pixels are decoded."""
    def load(self, *a, **k):
        raise AssertionError(f"decoded a {self.size} image; it should have been refused from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_check_image_size_names_the_limit():
    check_image_size(224, 224)
    check_image_size(50, 1)  # exactly the aspect limit
    with pytest.raises(ImageRefused) as e:
        check_image_size(500_000, 1, "t.png")
    assert type(e.value) is ImageRefused and e.value.status == 422 and e.value.limit == "max_aspect_ratio"
    assert e.value.maximum == MAX_ASPECT_RATIO and e.value.value == 500_000
    msg = str(e.value)
    assert "\n" not in msg and "t.png" in msg and "max_aspect_ratio" in msg and "CTXSIM_MAX_ASPECT_RATIO" in msg
    with pytest.raises(ImageTooLarge) as e:
        check_image_size(10_000, 10_000)
    assert e.value.status == 413 and e.value.limit == "max_pixels" and e.value.maximum == MAX_IMAGE_PIXELS
    assert isinstance(e.value, ImageRefused) and isinstance(e.value, DataError)
    with pytest.raises(ImageRefused, match="no pixels"):
        check_image_size(0, 5)
    check_image_size(10_000, 10_000, check_pixels=False)  # an image decoded already: only its resize is bounded
    check_image_size(100, 100, max_pixels=10_000)
    with pytest.raises(ImageTooLarge):
        check_image_size(101, 100, max_pixels=10_000)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("CTXSIM_MAX_ASPECT_RATIO", "1000")
    monkeypatch.setenv("CTXSIM_MAX_IMAGE_PIXELS", "1_000")
    assert image_limits() == (1000, 1000.0)
    check_image_size(500, 1)
    with pytest.raises(ImageTooLarge):
        check_image_size(40, 40)
    monkeypatch.setenv("CTXSIM_MAX_ASPECT_RATIO", "wide")
    with pytest.raises(ConfigError, match="CTXSIM_MAX_ASPECT_RATIO"):
        image_limits()


def test_the_565_byte_upload_is_refused_before_decoding(no_decoding):
    from ctxsim.data.images import open_image
    from ctxsim.deploy.gallery import load_image

    data = _png(500_000, 1)
    assert len(data) < 2000
    with pytest.raises(ImageRefused, match="max_aspect_ratio"):
        open_image(io.BytesIO(data))
    with pytest.raises(ImageRefused, match="<upload>"):
        load_image(data)


def test_a_decoded_image_is_checked_before_its_resize():
    from ctxsim.deploy.gallery import load_image

    with pytest.raises(ImageRefused, match="max_aspect_ratio"):
        load_image(Image.new("L", (100_000, 1)))
    assert load_image(Image.new("L", (40, 2))).size == (40, 2)


def test_datasets_refuse_or_skip_and_name_the_file(tmp_path):
    from ctxsim.data.datasets import ImageFolderDataset

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "1.png").write_bytes(_png(5000, 2))  # aspect 2500: what eval / parity / train would read
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(ImageRefused, match=r"a/1\.png.*max_aspect_ratio"):
        ds.load_image(1)
    skip = ImageFolderDataset(tmp_path, on_error="skip")
    img, label = skip[1]
    assert label == skip.labels[1] and img.size == (16, 16)
    assert skip.skipped == [str(tmp_path / "a" / "1.png")]


def test_gallery_skips_and_reports(tmp_path, no_decoding):
    from ctxsim.deploy.gallery import load_images

    wide, big = tmp_path / "wide.png", tmp_path / "big.png"
    wide.write_bytes(_png(3000, 1))
    big.write_bytes(_png(9000, 9000, 0))  # 81 MP in a few kB: over the 64 MP default
    images, ok, bad = load_images([wide, big])
    assert images == [] and ok == []
    assert [p for p, _ in bad] == [str(wide), str(big)]
    assert "max_aspect_ratio" in bad[0][1] and "max_pixels" in bad[1][1]


def test_device_decode_checks_each_header():
    torch = pytest.importorskip("torch")
    from ctxsim.data.device_decode import DeviceEvalTransform
    from ctxsim.data.transforms import Preprocess
    from ctxsim.errors import MissingDependency

    buf = io.BytesIO()
    Image.new("L", (3000, 10), 200).save(buf, format="JPEG")
    try:
        t = DeviceEvalTransform(Preprocess.greyscale(28, 28), "cpu")
    except MissingDependency as e:
        pytest.skip(str(e))
    ok = io.BytesIO()
    Image.new("L", (40, 30), 100).save(ok, format="JPEG")
    as_tensor = lambda b: torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8)  # noqa: E731
    assert t([as_tensor(ok)]).shape == (1, 1, 28, 28)
    with pytest.raises(ImageRefused, match="max_aspect_ratio"):
        t([as_tensor(ok), as_tensor(buf)])
