"""DDP on CPU (gloo, 2 processes): one DDP step equals one single-process step on the concatenated batch, and a
2-process run on the digits recipe trains, evaluates once on rank 0, and resumes."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctxsim.config import LossConfig, resolve_config
from ctxsim.distributed import all_gather_with_grad_on_local

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(WORLD, free_port(), *args), nprocs=WORLD, join=True)


# ------------------------------------------------------------------------------------ (a) one step equivalence
def step_config(loss: str):
    # batch 48 = 4 classes x m 12 -> 2 classes per rank; frozen BN so per-rank batch statistics play no part
    cfg = resolve_config("digits-demo", overrides={
        "epochs": 1, "seed": 3, "device": "cpu",
        "data": {"batch_size": 48, "m": 12, "batches_per_epoch": 1},
        "model": {"frozen_bn": True}, "optim": {"lr": 1e-3}})
    if loss != "hybrid":
        cfg = dataclasses.replace(cfg, loss=LossConfig(name=loss))
    return cfg


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 32, 32, generator=g)
    y = torch.arange(4).repeat_interleave(12)  # classes laid out contiguously, as the sampler does
    return x, y


def grads(trainer) -> dict:
    """The gradients the optimizers just used (DDP: after the all-reduce; proxies: after the 1/W rescale)."""
    named = list(trainer.model.named_parameters()) + [(f"loss.{k}", p) for k, p in trainer.loss.named_parameters()]
    return {k: p.grad.detach().clone() for k, p in named if p.grad is not None}


def _one_step(rank: int, world: int, port: int, loss: str, out: str) -> None:
    _env(rank, world, port)
    from ctxsim.train import Trainer

    trainer = Trainer(step_config(loss), Path(out) / "run")
    x, y = fixed_batch()
    n = len(x) // world
    trainer.model.train()
    value = trainer.train_step(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"loss.{k}": v.detach().clone() for k, v in trainer.loss.state_dict().items()})
    torch.save({"loss": value, "state": state, "grads": grads(trainer)}, Path(out) / f"rank{rank}.pt")
    trainer.close()


@pytest.mark.parametrize("loss", ["hybrid", "contrastive", "proxy-anchor"])
def test_ddp_step_equals_single_process_step(tmp_path, loss):
    from ctxsim.train import Trainer

    _spawn(_one_step, loss, str(tmp_path))
    single = Trainer(step_config(loss), tmp_path / "single")
    single.model.train()
    before = {k: v.detach().clone() for k, v in single.model.state_dict().items()}
    x, y = fixed_batch()
    value = single.train_step(x, y)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected = dict(single.model.state_dict())
    expected.update({f"loss.{k}": v for k, v in single.loss.state_dict().items()})  # proxies (own optimizer)
    moved = 0
    for r in ranks:
        assert r["loss"] == pytest.approx(value, rel=1e-5, abs=1e-6)  # every rank saw the global batch
        assert r["state"].keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(r["state"][k], v, rtol=0, atol=1e-5, msg=k)
            moved += int(k in before and not torch.equal(v, before[k]))
        # Adam's first step hardly depends on the gradient's scale, so check the gradients themselves:
        # this is what catches a wrong world-size factor
        g = grads(single)
        assert r["grads"].keys() == g.keys() and g
        for k, v in g.items():
            err = (r["grads"][k] - v).abs().max().item()
            assert err <= 1e-4 * v.abs().max().item() + 1e-8, (k, err, v.abs().max().item())
    assert moved > 0  # the step did change the weights


def _gather_grad(rank: int, world: int, port: int, out: str) -> None:
    _env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    g = all_gather_with_grad_on_local(x)
    (g * torch.arange(1.0, 5.0)[:, None]).sum().backward()  # weight rows 1..4
    torch.save({"gathered": g.detach(), "grad": x.grad}, Path(out) / f"g{rank}.pt")
    dist.destroy_process_group()


def test_gather_places_local_slice_with_gradient(tmp_path):
    _spawn(_gather_grad, str(tmp_path))
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"g{rank}.pt", weights_only=True)
        assert torch.equal(r["gathered"][:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
        rows = torch.arange(1.0, 5.0)[2 * rank:2 * rank + 2]
        assert torch.equal(r["grad"], rows[:, None].expand(2, 3))  # gradient only from this rank's rows


# ------------------------------------------------------------------------------------ (b) a run, then resume
def run_config(epochs: int):
    return resolve_config("digits-demo", overrides={
        "epochs": epochs, "device": "cpu", "eval_ks": [1, 2],
        "data": {"batch_size": 48, "m": 12, "batches_per_epoch": 3}})


def _run(rank: int, world: int, port: int, out: str, epochs: int, resume_it: bool) -> None:
    _env(rank, world, port)
    from ctxsim.train import resume, train

    events: list[str] = []

    def callback(event, **info):
        events.append(event)

    run = Path(out) / "run"
    result = resume(run, callback, epochs=epochs) if resume_it else train(run_config(epochs), run, callback)
    tag = "resume" if resume_it else "train"
    (Path(out) / f"{tag}{rank}.json").write_text(
        json.dumps({"metrics": result.metrics, "history": result.history, "events": events}))


def test_two_process_digits_run_trains_evaluates_and_resumes(tmp_path):
    run = tmp_path / "run"
    _spawn(_run, str(tmp_path), 2, False)
    for name in ("config.yaml", "model.safetensors", "model.json", "checkpoints/last.safetensors"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written once, by rank 0
    assert "test/R@1" in records[-1] and 0.0 <= records[-1]["test/R@1"] <= 1.0
    r0, r1 = (json.loads((tmp_path / f"train{r}.json").read_text()) for r in range(WORLD))
    assert r0["metrics"] == r1["metrics"] and r0["history"] == r1["history"] == records  # broadcast to all ranks
    assert "start" in r0["events"] and "eval" in r0["events"] and r1["events"] == []  # rank 0 reports alone
    assert records[0]["images_per_s"] > 0

    _spawn(_run, str(tmp_path), 3, True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    s0, s1 = (json.loads((tmp_path / f"resume{r}.json").read_text()) for r in range(WORLD))
    assert s0["history"][:2] == r0["history"] and s0["metrics"] == s1["metrics"]
    assert s0["metrics"]["R@1"] == records[-1]["test/R@1"]
    assert s0["history"] == s1["history"] == records
