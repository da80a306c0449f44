"""data.decode=device: the loader reads JPEG bytes, DeviceAugment decodes and augments on the training device.

Run here on the CPU (libjpeg); the same code path with device="cuda" uses nvJPEG (tests/core/test_gpu.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from ctxsim.config import resolve_config
from ctxsim.data.datasets import ImageFolderDataset
from ctxsim.data.device_decode import DeviceAugment, EncodedImages, collate_encoded, jpeg_decoder
from ctxsim.data.pipeline import build_datasets
from ctxsim.data.transforms import Preprocess, train_transform
from ctxsim.errors import ConfigError, DataError
from ctxsim.train import Trainer


def jpeg_tree(root, classes=6, per_class=6, size=(40, 48)):
    """Real digits, upscaled, coloured per class and saved as JPEG files in a class-per-folder tree."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"digit{c}"
        d.mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == c][:per_class]):
            grey = Image.fromarray((img * 255 / 16).astype(np.uint8)).resize(size, Image.BILINEAR)
            tint = rng.uniform(0.4, 1.0, 3)
            rgb = (np.asarray(grey, dtype=np.float32)[..., None] * tint).astype(np.uint8)
            Image.fromarray(rgb).save(d / f"{i}.jpg", quality=95)
    return root


def config(root, device="cpu", **data):
    return resolve_config("digits-demo", overrides={"device": device,
        "data": {"dataset": "folder", "root": str(root), "m": 2, "batch_size": 6, "test_classes": 0.5,
                 "decode": "device", **data},
        "preprocess": {"input_size": 32, "resize_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                       "channels": "RGB"},
        "model": {"in_channels": 3}, "epochs": 1})


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
@pytest.mark.parametrize("channels", ["RGB", "L"])
def test_same_seed_gives_the_pillow_train_transform(tmp_path, channels, decoder):
    """Crop box and flip are drawn in the same order from the same generator as train_transform's, so with equal
    seeds both pipelines produce the same augmented image, up to decoder and resampling rounding."""
    if decoder == "torchcodec":
        pytest.importorskip("torchcodec.decoders", reason="TorchCodec is not installed (pip install 'ctxsim[decode]')")
    ds = ImageFolderDataset(jpeg_tree(tmp_path))
    mean, std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)) if channels == "RGB" else ((0.45,), (0.22,))
    p = Preprocess(24, 24, mean, std, channels)
    pil = train_transform(p, scale=(0.3, 1.0), hflip=True)
    dev = DeviceAugment(p, (0.3, 1.0), hflip=True, device="cpu", decoder=decoder)
    assert dev.decoder == decoder
    enc = EncodedImages(ds)
    out, ref = [], []
    for i in range(12):
        torch.manual_seed(i)
        ref.append(pil(ds.load_image(i)))
        torch.manual_seed(i)
        out.append(dev(collate_encoded([enc[i]])[0])[0])
    out, ref = torch.stack(out), torch.stack(ref)
    assert out.shape == ref.shape == (12, len(mean), 24, 24) and out.dtype == torch.float32
    diff = (out - ref).abs() * torch.tensor(std).view(1, -1, 1, 1)  # back in [0, 1] pixel units
    assert diff.mean() < 0.003 and diff.max() < 0.02, (diff.mean(), diff.max())  # 1-2 grey levels seen
    assert collate_encoded([enc[i] for i in range(5)])[1].tolist() == ds.labels[:5]


def test_random_crops_and_flips_follow_the_seed(tmp_path):
    ds = ImageFolderDataset(jpeg_tree(tmp_path))
    enc = EncodedImages(ds)
    batch, _ = collate_encoded([enc[i] for i in range(12)])
    dev = DeviceAugment(Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3), (0.2, 0.5), hflip=True, device="cpu")
    torch.manual_seed(3)
    a = dev(batch)
    torch.manual_seed(3)
    b = dev(batch)
    torch.manual_seed(4)
    c = dev(batch)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    full = DeviceAugment(Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3), (1.0, 1.0), hflip=False, device="cpu")(batch)
    assert (a - full).abs().mean() > 0.05  # crops of 20-50 % of the frame are not the whole frame


def test_flip_mirrors_the_image(tmp_path):
    ds = ImageFolderDataset(jpeg_tree(tmp_path, classes=1, per_class=1, size=(40, 40)))  # square: scale 1 = frame
    batch, _ = collate_encoded([EncodedImages(ds)[0]] * 64)
    p = Preprocess(16, 16, (0.5,) * 3, (0.5,) * 3)
    plain = DeviceAugment(p, (1.0, 1.0), hflip=False, device="cpu")(batch[:1])[0]
    torch.manual_seed(0)
    out = DeviceAugment(p, (1.0, 1.0), hflip=True, device="cpu")(batch)
    flipped = [torch.allclose(o, plain.flip(-1)) for o in out]
    same = [torch.allclose(o, plain) for o in out]
    assert all(f != s for f, s in zip(flipped, same))  # each image is either the original or its mirror
    assert 16 < sum(flipped) < 48


def test_trainer_runs_an_epoch_with_device_decode(tmp_path):
    cfg = config(jpeg_tree(tmp_path / "data"))
    data = build_datasets(cfg)
    x, _y = next(iter(data.loader))
    assert isinstance(x, list) and x[0].dtype == torch.uint8 and x[0].dim() == 1 and len(x) == 6
    assert data.augment(x).shape == (6, 3, 32, 32)
    trainer = Trainer(cfg, tmp_path / "run")
    stats = trainer.train_epoch()
    assert np.isfinite(stats["loss"]) and stats["loss"] > 0
    assert "R@1" in trainer.evaluate()["test"]  # evaluation keeps the Pillow eval transform


def test_refuses_what_it_cannot_decode(tmp_path, omniglot_dir):
    with pytest.raises(ConfigError, match="image files on disk"):  # Omniglot is read from its zips
        build_datasets(resolve_config("omniglot", overrides={"data": {"root": str(omniglot_dir),
                                                                      "decode": "device"}}))
    with pytest.raises(ConfigError, match="image files on disk"):  # digits come from an array
        build_datasets(resolve_config("digits-demo", overrides={"data": {"decode": "device"}}))
    root = jpeg_tree(tmp_path / "data")
    with pytest.raises(ConfigError, match="on_error"):
        build_datasets(config(root, on_error="skip"))
    Image.new("RGB", (8, 8)).save(root / "digit0" / "extra.png")
    with pytest.raises(ConfigError, match="JPEG only"):
        build_datasets(config(root))
    with pytest.raises(ConfigError, match="interpolation"):
        DeviceAugment(Preprocess(8, 8, (0.5,), (0.5,), "L", "lanczos"), (0.5, 1.0), True, "cpu")
    with pytest.raises(ConfigError, match="data.decode"):
        config(root, decode="gpu")


def test_decoder_choice():
    assert jpeg_decoder()[0] == "torchvision"  # while torchvision still has it: no EXIF work needed
    with pytest.raises(ConfigError, match="torchcodec or torchvision"):
        jpeg_decoder("pillow")


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decoders_ignore_exif_orientation_like_pillow(decoder, orientation):
    """Pillow (the evaluation and export pipelines) keeps the stored pixel layout whatever the EXIF orientation
    tag says; TorchCodec applies the tag, so its result is turned back."""
    import io

    if decoder == "torchcodec":
        pytest.importorskip("torchcodec.decoders", reason="TorchCodec is not installed (pip install 'ctxsim[decode]')")
    digit = load_digits().images[3]
    rgb = np.stack([digit * 15, np.tile(np.linspace(0, 255, 8), (8, 1)), digit[::-1] * 10], -1)
    im = Image.fromarray(rgb.astype(np.uint8)).resize((40, 24), Image.NEAREST)  # not square: rotations show
    exif = im.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    with Image.open(io.BytesIO(buf.getvalue())) as stored:
        pil = torch.from_numpy(np.asarray(stored.convert("RGB")).copy()).permute(2, 0, 1)
    name, decode = jpeg_decoder(decoder)
    out = decode([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], "RGB", "cpu")[0]
    assert name == decoder and out.shape == pil.shape == (3, 24, 40)
    assert (out.int() - pil.int()).abs().max() <= 1


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_a_corrupt_jpeg_names_the_batch_error(tmp_path, decoder):
    root = jpeg_tree(tmp_path / "data", classes=1, per_class=2)
    (root / "digit0" / "0.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    enc = EncodedImages(ImageFolderDataset(root))
    batch, _ = collate_encoded([enc[0], enc[1]])
    with pytest.raises(DataError, match="cannot decode"):
        DeviceAugment(Preprocess(8, 8, (0.5,) * 3, (0.5,) * 3), (0.5, 1.0), True, "cpu", decoder=decoder)(batch)
