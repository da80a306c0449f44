"""CUDA paths: a bf16 step keeps the loss in float32 and matches CPU fp32 loosely, channels_last, a step with the
backbone compiled, nvJPEG decoding (data.decode=device), and serving: the Embedder on CUDA (fp32, bf16, compiled,
nvJPEG) and a "torch" index searched on the GPU. Skipped where no CUDA GPU is visible (run by
benchmarks/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

from ctxsim.config import resolve_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def config(**top):
    over = {"epochs": 1, "seed": 5, "data": {"batch_size": 48, "m": 12, "batches_per_epoch": 1},
            "model": {"frozen_bn": True}, **top}
    return resolve_config("digits-demo", overrides=over)


def batch(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 1, 32, 32, generator=g).to(device), torch.arange(4).repeat_interleave(12).to(device)


def capture_loss_dtype(trainer) -> dict:
    seen: dict = {}

    def hook(module, args, output):
        seen["emb"], seen["loss"] = args[0].dtype, output.dtype

    trainer.loss.register_forward_hook(hook)
    return seen


def test_bf16_step_keeps_loss_float32_and_matches_cpu(tmp_path):
    from ctxsim.train import Trainer

    gpu = Trainer(config(device="cuda", amp="bf16"), tmp_path / "gpu")
    cpu = Trainer(config(device="cpu", amp="off"), tmp_path / "cpu")
    assert gpu.amp == torch.bfloat16 and cpu.amp is None
    for (k, a), b in zip(gpu.model.state_dict().items(), cpu.model.state_dict().values()):
        torch.testing.assert_close(a.cpu(), b, msg=k)  # same seed -> same initial weights
    seen = capture_loss_dtype(gpu)
    x, y = batch()
    gpu.model.train()
    cpu.model.train()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        e_gpu = gpu.model(x.cuda().contiguous(memory_format=torch.channels_last)).float().cpu()
    with torch.no_grad():
        e_cpu = cpu.model(x)
    cos = torch.nn.functional.cosine_similarity(e_gpu, e_cpu, dim=1)
    assert cos.min() > 0.98, cos.min()
    v_gpu, v_cpu = gpu.train_step(x, y), cpu.train_step(x, y)
    assert seen == {"emb": torch.float32, "loss": torch.float32}
    assert abs(v_gpu - v_cpu) < 0.1 * abs(v_cpu) + 1e-3, (v_gpu, v_cpu)
    assert all(torch.isfinite(p).all() for p in gpu.model.parameters())


def test_channels_last_on_cuda(tmp_path):
    from ctxsim.train import Trainer

    trainer = Trainer(config(device="cuda", channels_last=True), tmp_path / "run")
    assert trainer.channels_last and trainer.amp == torch.bfloat16  # amp auto -> bf16 on CUDA
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert trainer.optimizer.defaults.get("fused") is True
    x, y = batch()
    v1 = trainer.train_step(x, y)
    v2 = trainer.train_step(x, y)
    assert torch.isfinite(torch.tensor([v1, v2])).all()


def test_compiled_backbone_step(tmp_path):
    from ctxsim.train import Trainer

    # one eval batch for the whole digits test split: one extra (eval-mode) compile, not two
    trainer = Trainer(config(device="cuda", compile=True, eval_batch_size=1024), tmp_path / "run")
    x, y = batch()
    values = [trainer.train_step(x, y) for _ in range(3)]
    assert all(v == v and abs(v) < 1e3 for v in values)
    assert not any("_orig_mod" in k for k in trainer.model.state_dict())  # checkpoints keep plain keys
    trainer.cfg.epochs = 1
    result = trainer.fit()  # a whole (1-step) epoch with evaluation through the compiled backbone
    assert 0.0 <= result.metrics["R@1"] <= 1.0


def test_nvjpeg_device_decode_matches_the_cpu_path(tmp_path):
    """data.decode=device on CUDA (nvJPEG) gives the CPU (libjpeg) result for the same seed, and trains."""
    from test_device_decode import config as jpeg_config
    from test_device_decode import jpeg_tree

    from ctxsim.data.datasets import ImageFolderDataset
    from ctxsim.data.device_decode import DeviceAugment, EncodedImages, collate_encoded
    from ctxsim.data.transforms import Preprocess
    from ctxsim.train import Trainer

    root = jpeg_tree(tmp_path / "data")
    enc = EncodedImages(ImageFolderDataset(root))
    batch_bytes, _ = collate_encoded([enc[i] for i in range(12)])
    p = Preprocess(24, 24, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    out = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        out[dev] = DeviceAugment(p, (0.3, 1.0), True, dev)(batch_bytes).cpu()
    diff = (out["cuda"] - out["cpu"]).abs() * torch.tensor(p.std).view(1, -1, 1, 1)
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())  # decoders' IDCTs differ slightly
    trainer = Trainer(jpeg_config(root, device="cuda"), tmp_path / "run")
    assert trainer.data.augment.device.type == "cuda"
    assert torch.isfinite(torch.tensor(trainer.train_epoch()["loss"]))


def test_embedder_on_cuda_matches_cpu(tmp_path):
    """Serving on a GPU: the torch backend on CUDA (fp32, bf16, compiled with CUDA graphs, nvJPEG decoding)
    embeds like the CPU, and an exact "torch" index searches on the GPU like on the CPU."""
    import numpy as np
    from test_device_decode import jpeg_tree

    from ctxsim.data.transforms import Preprocess
    from ctxsim.deploy import Embedder, build_index, load_index
    from ctxsim.nets import EmbeddingNet, ModelSpec, save_model

    torch.manual_seed(0)
    spec = ModelSpec(backbone="convnet", in_channels=3, embedding_dim=64, pooling="max", frozen_bn=False)
    run = tmp_path / "run"
    run.mkdir()
    save_model(run, EmbeddingNet(spec), Preprocess(32, 36, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))
    paths = sorted(jpeg_tree(tmp_path / "data").rglob("*.jpg"))
    ref, ok, _ = Embedder.from_artifact(run, device="cpu", batch_size=16).embed_files(paths)
    assert len(ok) == len(paths)
    # compile: CUDA graphs without max-autotune's minutes of tuning; compile_for_inference itself (max-autotune,
    # freezing) runs in benchmarks/gpu_inference.py, whose parity check covers it
    for kw, floor in [({}, 0.9999), ({"precision": "bf16"}, 0.99), ({"compile": "reduce-overhead"}, 0.9999),
                      ({"device_decode": True}, 0.995)]:
        emb, ok, bad = Embedder.from_artifact(run, device="cuda", batch_size=16, **kw).embed_files(paths)
        assert not bad and len(ok) == len(paths)
        cos = (emb * ref).sum(1)
        assert cos.min() > floor, (kw, cos.min())

    info = build_index(paths, run, tmp_path / "idx", index_type="torch")
    cpu, gpu = load_index(info.path, device="cpu"), load_index(info.path, device="cuda")
    s_cpu, i_cpu = cpu.search(ref[:7], 5)
    s_gpu, i_gpu = gpu.search(ref[:7], 5)
    np.testing.assert_allclose(s_gpu, s_cpu, atol=1e-5)
    assert (i_gpu[:, 0] == np.arange(7)).all() and (i_cpu[:, 0] == np.arange(7)).all()
