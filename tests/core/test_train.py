"""The Trainer: run folder contents, exact resume, divergence handling, config resolution."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ctxsim.config import parse_set, resolve_config
from ctxsim.errors import ConfigError, TrainingDiverged
from ctxsim.nets import load_run
from ctxsim.train import Trainer, read_best, read_checkpoint, resume, train


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def metric_records(run):
    """metrics.jsonl without the one field that is a wall-clock measurement."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def tiny_config(**overrides):
    base = {"epochs": 2, "data": {"batches_per_epoch": 3}, "eval_ks": [1, 2]}
    for k, v in overrides.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return resolve_config("digits-demo", overrides=base)


def test_run_folder_contents(tmp_path):
    result = train(tiny_config(), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.yaml", "model.safetensors", "model.json", "metrics.jsonl",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["optim"]["backbone_lr_scale"] == 0.5 and cfg["data"]["m"] == 12  # every default written out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert 0.0 <= records[-1]["test/R@1"] <= 1.0 and "test/MAP@R" in records[-1]
    assert result.metrics["R@1"] == records[-1]["test/R@1"]
    best = read_best(run)
    assert best["metric"] == "test/R@1" and best["value"] == max(r["test/R@1"] for r in records)
    assert best["epoch"] == max(records, key=lambda r: r["test/R@1"])["epoch"]
    best_weights = load_file(str(run / "checkpoints" / "best.safetensors"))
    final = load_file(str(run / "model.safetensors"))
    assert torch.equal(best_weights["head.weight"], final["head.weight"]) == (best["epoch"] == 2)
    _model, card = load_run(run)
    assert card.embedding_dim == 64 and card.preprocess.channels == "L"
    assert not list(run.rglob(".*.tmp"))
    ckpt = read_checkpoint(run)  # one file: weights and trainer state of the same epoch, with the history
    assert ckpt.epoch == 2 and [r["epoch"] for r in ckpt.state["history"]] == [1, 2]
    assert ckpt.state["best"] == best
    for k, v in final.items():
        assert torch.equal(ckpt.weights[k], v), k
    for p in [*run.rglob("*.safetensors"), *run.rglob("*.json*"), run / "config.yaml"]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~_umask(), p  # readable by e.g. a Triton container


def test_backbone_trains_at_half_the_head_rate(tmp_path):
    cfg = tiny_config(optim={"lr": 0.004})
    trainer = Trainer(cfg, tmp_path / "run")
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == [pytest.approx(0.002), pytest.approx(0.004)]


def test_resume_continues_exactly(tmp_path):
    """2 epochs straight == 1 epoch, then resume for 1 more (same seed): identical weights."""
    straight = train(tiny_config(epochs=2), tmp_path / "straight")
    train(tiny_config(epochs=1), tmp_path / "split")
    resumed = resume(tmp_path / "split", epochs=2)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.metrics == straight.metrics
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert metric_records(tmp_path / "split") == metric_records(tmp_path / "straight")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(epochs=1), run)
    good = read_checkpoint(run).weights
    trainer = Trainer(tiny_config(epochs=3), run)
    trainer.load_checkpoint()
    calls = {"n": 0}
    real = trainer.loss.forward

    def poisoned(emb, labels):
        calls["n"] += 1
        value = real(emb, labels)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(trainer.loss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="checkpoint"):
        trainer.fit()
    kept = read_checkpoint(run).weights
    for k in good:
        assert torch.equal(good[k], kept[k])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_train_refuses_to_overwrite_a_run(tmp_path):
    train(tiny_config(epochs=1), tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_config(epochs=1), tmp_path / "run")


def test_config_resolution_and_errors(tmp_path):
    cfg = resolve_config("omniglot", overrides=parse_set(["optim.lr=3e-4", "loss.params.k=8", "data.root=/x"]))
    assert cfg.optim.lr == 3e-4 and cfg.loss.params["k"] == 8 and cfg.loss.params["lam"] == 0.4
    assert cfg.data.root == "/x" and cfg.model.backbone == "convnet"
    with pytest.raises(ConfigError, match="unknown setting 'optim.lrr'"):
        resolve_config("omniglot", overrides=parse_set(["optim.lrr=1"]))
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve_config("nope")
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["optim.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(config_file=bad)


def test_switching_loss_drops_the_previous_loss_parameters():
    cfg = resolve_config("omniglot", overrides=parse_set(["loss.name=contrastive"]))
    assert cfg.loss.name == "contrastive" and cfg.loss.params == {}
    cfg = resolve_config("omniglot", overrides=parse_set(["loss.name=triplet", "loss.params.margin=0.1"]))
    assert cfg.loss.params == {"margin": 0.1}
    cfg = resolve_config("omniglot", overrides=parse_set(["loss.params.k=8"]))
    assert cfg.loss.params["lam"] == 0.4 and cfg.loss.params["k"] == 8
