"""JPEG files -> a preprocessed batch on the device: Pillow (one CPU core) vs decoding on the device.

    python benchmarks/decode_throughput.py                 # CPU here; CUDA (nvJPEG) in benchmarks/gpu_check.sh
    python benchmarks/decode_throughput.py --dry-run       # 32 small images: checks the code path

Images: random 500x375 crops (and 375x500, as photo datasets mix both) of scikit-learn's two sample
photographs, saved as JPEG quality 90: real photo content, the typical size of CUB/Cars/SOP images.
Preprocessing: the ImageNet contract, 224 px crop of a 256 px resize. Four pipelines, each ending in a
(64, 3, 224, 224) float32 batch on the device:

- eval, Pillow: ``load_image`` + ``eval_transform`` per image, stacked, copied to the device (what
  ``Embedder.embed_files`` does without ``device_decode``);
- eval, device: the files' bytes, decoded in one call and resized/cropped there (``DeviceEvalTransform``:
  ``ctxsim index build --device-decode``);
- train, Pillow: ``train_transform`` (RandomResizedCrop, flip) per image (``data.decode: loader``; each DataLoader
  worker runs this, so multiply by the workers the machine can feed);
- train, device: ``DeviceAugment`` (``data.decode: device``).

Blocks are interleaved and the median block is reported. The Pillow paths use one thread (one loader worker);
on the CPU the device paths use one torch thread as well, so the CPU rows compare decoders core for core.
Writes decode_throughput_<device>.md/.json under benchmarks/results and $OUT.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, median, pick, report, set_cpu_threads, sync


def write_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two real 427x640 photographs
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = size if i % 2 == 0 else size[::-1]
        src = Image.fromarray(photos[i % len(photos)])
        scale = max(w / src.width, h / src.height) * rng.uniform(1.0, 1.5)
        src = src.resize((int(src.width * scale) + 1, int(src.height * scale) + 1), Image.BICUBIC)
        x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
        path = folder / f"{i:04d}.jpg"
        src.crop((x, y, x + w, y + h)).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=3, help="interleaved measurements per pipeline")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dry-run", action="store_true", help="32 images of 200x150, batch 16, 1 block")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = pick(a.device)
    set_cpu_threads(device, a.threads)
    size, crop, resize = (500, 375), 224, 256
    if a.dry_run:
        a.images, a.batch, a.blocks, size, crop, resize = 32, 16, 1, (200, 150), 112, 128

    from ctxsim.data.datasets import ImageDataset, Record
    from ctxsim.data.device_decode import (
        DeviceAugment,
        DeviceEvalTransform,
        EncodedImages,
        collate_encoded,
        jpeg_decoder,
    )
    from ctxsim.data.transforms import Preprocess, eval_transform, train_transform
    from ctxsim.deploy.gallery import load_image

    p = Preprocess.imagenet(crop, resize)
    scale = (0.16, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), a.images, size)
        ds = ImageDataset([Record(str(q), "photo") for q in paths])
        encoded = EncodedImages(ds)
        batches = [list(range(s, min(s + a.batch, len(paths)))) for s in range(0, len(paths), a.batch)]
        ev, tr = eval_transform(p), train_transform(p, scale=scale, hflip=True)
        decoders = ["torchvision"] + (["torchcodec"] if jpeg_decoder("torchcodec")[0] == "torchcodec" else [])
        dev_eval = {d: DeviceEvalTransform(p, device, decoder=d) for d in decoders}
        dev_train = {d: DeviceAugment(p, scale, True, device, decoder=d) for d in decoders}

        def pillow(transform):
            def run():
                for b in batches:
                    torch.stack([transform(load_image(paths[i])) for i in b]).to(device)
            return run

        def on_device(transform):
            def run():
                for b in batches:
                    transform(collate_encoded([encoded[i] for i in b])[0])
            return run

        pipelines = {("eval", "Pillow, 1 core"): pillow(ev)}
        pipelines.update({("eval", f"device, {d}"): on_device(dev_eval[d]) for d in decoders})
        pipelines[("train", "Pillow, 1 core")] = pillow(tr)
        pipelines.update({("train", f"device, {d}"): on_device(dev_train[d]) for d in decoders})
        for fn in pipelines.values():  # warm-up: caches, nvJPEG handles, kernels
            fn()
        times: dict = {k: [] for k in pipelines}
        for _ in range(a.blocks):
            for key, fn in pipelines.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[key].append(time.perf_counter() - t0)

        # how close the device eval path is to Pillow's, in grey levels of the 0-255 input
        ref = torch.stack([ev(load_image(q)) for q in paths[:a.batch]])
        got = dev_eval[decoders[0]](collate_encoded([encoded[i] for i in range(min(a.batch, len(paths)))])[0]).cpu()
        grey = ((got - ref).abs() * torch.tensor(p.std).view(1, 3, 1, 1) * 255)
    rows, data_rows = [], []
    ips = {k: len(paths) / median(v) for k, v in times.items()}
    for (stage, path), v in ips.items():
        base = ips[(stage, "Pillow, 1 core")]
        rows.append([stage, path, f"{v:,.0f}", f"{v / base:.2f}x"])
        data_rows.append({"stage": stage, "path": path, "images_per_s": v, "vs_pillow": v / base})
    md = (f"**JPEG decode + preprocessing, {size[0]}x{size[1]} photos -> {crop} px batches of {a.batch} on "
          f"{device.type}**\n\nMachine: {machine(device)}. {len(paths)} images, median of {a.blocks} interleaved "
          f"passes.\n\n" + markdown_table(["stage", "path", "images/s", "vs Pillow"], rows)
          + f"\n\nEval path on the device ({decoders[0]}) vs Pillow: mean {grey.mean():.2f}, max {grey.max():.1f} grey levels "
          "(tensor vs Pillow resampling).")
    data = {"device": device.type, "machine": machine(device), "images": len(paths), "size": list(size),
            "crop": crop, "batch": a.batch, "rows": data_rows, "grey_mean": float(grey.mean()),
            "grey_max": float(grey.max()), "decoders": decoders}
    return report("decode_throughput", device, md, data, a.out, a.dry_run)


if __name__ == "__main__":
    main()
