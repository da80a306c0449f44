"""Checkpoints under kill -9: real training subprocesses killed at named write points (the CTXSIM_FAULT hook of
ctxsim.io), then resumed; the result equals the uninterrupted run bit for bit, or resume refuses with one line.
Also: stale temporaries of killed writes are swept, a concurrent writer's are not; artifacts are mode 0644."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctxsim.config import resolve_config
from ctxsim.errors import ArtifactError
from ctxsim.io import FAULT_ENV, _host_tag, atomic_path, atomic_write_bytes, atomic_write_safetensors, sweep_stale_temps
from ctxsim.train import read_best, read_checkpoint, resume, train, write_checkpoint

EPOCHS = 3
SETS = [f"epochs={EPOCHS}", "data.batches_per_epoch=2", "eval_ks=[1]"]


def config(epochs: int = EPOCHS):
    return resolve_config("digits-demo", overrides={"epochs": epochs, "data": {"batches_per_epoch": 2},
                                                    "eval_ks": [1]})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ctxsim.cli", "train", *args], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _train_killed_at(point: str, run: Path) -> subprocess.Popen:
    """Start `ctxsim train` into ``run`` that SIGKILLs itself at ``point`` (see ctxsim.io's docstring)."""
    sets = [a for s in SETS for a in ("--set", s)]
    return _cli("--recipe", "digits-demo", *sets, "--out", str(run), **{FAULT_ENV: point})


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=600)
    return proc.returncode, err


@pytest.fixture(scope="module")
def one_thread():
    """The subprocesses run with one thread; so does this process while these tests run (same kernels, same bits;
    and no oversubscription of a small machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _records(run: Path) -> list[dict]:
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def assert_same_run(run: Path, reference: Path) -> None:
    """Final weights, best checkpoint and metrics history equal the uninterrupted run's exactly."""
    for name in ("model.safetensors", "checkpoints/best.safetensors"):
        a, b = load_file(str(reference / name)), load_file(str(run / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
    assert read_best(run) == read_best(reference)
    assert _records(run) == _records(reference)
    assert [r["epoch"] for r in _records(run)] == list(range(1, EPOCHS + 1))
    assert read_checkpoint(run).epoch == EPOCHS
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]


# the default set: a kill inside epoch 2's checkpoint write before its rename (the reported bug), one right after
# epoch 1's commit (best.safetensors and metrics.jsonl not yet written: repaired on resume) and one inside the very
# first checkpoint write (nothing to resume: refused)
DEFAULT_POINTS = {"before_commit": "last.safetensors:written#2", "after_commit": "last.safetensors:replaced#1",
                  "first": "last.safetensors:written#1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The killed runs (in parallel subprocesses) and, meanwhile, the uninterrupted reference run in-process."""
    root = tmp_path_factory.mktemp("faults")
    procs = {name: _train_killed_at(point, root / name) for name, point in DEFAULT_POINTS.items()}
    t0 = time.perf_counter()
    train(config(), root / "reference")
    killed = {name: _finish(p) for name, p in procs.items()}
    print(f"reference + killed runs: {time.perf_counter() - t0:.1f} s")
    shutil.copytree(root / "before_commit", root / "epoch1")  # epoch 1 complete; for the old-layout test
    return root, killed


@pytest.mark.parametrize("name", ["before_commit", "after_commit"])
def test_resume_after_kill_inside_checkpoint_write_is_exact(runs, name):
    root, killed = runs
    rc, err = killed[name]
    assert rc == -signal.SIGKILL, err[-2000:]  # it really died at that point
    run = root / name
    assert read_checkpoint(run).epoch == 1      # what survived: epoch 1, whole
    result = resume(run)
    assert_same_run(run, root / "reference")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]


def test_kill_in_first_checkpoint_resume_refuses_with_one_line(runs):
    root, killed = runs
    rc, err = killed["first"]
    assert rc == -signal.SIGKILL, err[-2000:]
    run = root / "first"
    assert not (run / "checkpoints" / "last.safetensors").exists()
    assert list((run / "checkpoints").glob(".last.safetensors.*.tmp"))  # the killed write's temporary
    rc, err = _finish(_cli("--resume", str(run)))
    assert rc == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no complete checkpoint" in lines[0] and "ctxsim train" in lines[0], err


def test_damaged_checkpoint_is_refused(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "reference", run)
    last = run / "checkpoints" / "last.safetensors"
    data = bytearray(last.read_bytes())
    data[-100] ^= 0xFF                                   # one bit of the trainer state
    last.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="damaged") as e:
        resume(run)
    assert "\n" not in str(e.value)
    last.write_bytes(bytes(data[:len(data) // 2]))         # truncated
    with pytest.raises(ArtifactError, match="damaged"):
        read_checkpoint(run)
    good = read_checkpoint(root / "reference")             # intact bytes, but the state disagrees with itself
    write_checkpoint(last, good.weights, {**good.state, "history": good.state["history"][:-1]})
    with pytest.raises(ArtifactError, match="inconsistent"):
        read_checkpoint(run)
    write_checkpoint(last, good.weights, good.state)       # the same content, rewritten: accepted
    assert read_checkpoint(run).epoch == EPOCHS


def _to_legacy(run: Path, weights_epoch: int | None = None) -> None:
    """Rewrite a run's checkpoint in the old two-file layout (last.safetensors + last.state.pt, best.json)."""
    import json

    ck = run / "checkpoints"
    c = read_checkpoint(run)
    state = {k: v for k, v in c.state.items() if k not in ("history", "best")}
    save_file(c.weights, str(ck / "last.safetensors"), metadata={"epoch": str(weights_epoch or c.epoch)})
    torch.save(state, ck / "last.state.pt")
    best = c.state["best"]
    save_file(load_file(str(ck / "best.safetensors")), str(ck / "best.safetensors"),
              metadata={"epoch": str(best["epoch"])})
    (ck / "best.json").write_text(json.dumps(best))


def test_old_layout_resumes_exactly_or_refuses(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "old"
    shutil.copytree(root / "epoch1", run)  # a 3-epoch run killed inside epoch 2's checkpoint write
    _to_legacy(run)
    shutil.copytree(run, tmp_path / "torn")
    resume(run)
    assert_same_run(run, root / "reference")          # and the old pair is gone, superseded
    # the reported case: last.state.pt says epoch 2, last.safetensors holds epoch 1's weights
    torn = tmp_path / "torn"
    _to_legacy(torn, weights_epoch=2)
    with pytest.raises(ArtifactError, match="interrupted write") as e:
        resume(torn)
    assert "\n" not in str(e.value)


# ---- temporaries and modes ------------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _touch(path: Path, age_s: float = 0.0) -> Path:
    path.write_bytes(b"x")
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_next_write_sweeps_stale_temporaries_but_not_a_live_writers(tmp_path):
    tag, hour = _host_tag(), 3600
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [
            _touch(tmp_path / f".last.safetensors.{_dead_pid()}-{tag}.abcd_123.tmp"),   # dead writer, here
            _touch(tmp_path / ".index.3.faiss.k2j4h5g6.tmp", 2 * hour),                # old ctxsim, no pid
            _touch(tmp_path / ".tmpAb12Cd", 2 * hour),                                 # safetensors' own
            _touch(tmp_path / f".items.3.jsonl.{_dead_pid()}-0badf00d.abcdefgh.tmp", 2 * hour),  # other host
        ]
        kept = [
            _touch(tmp_path / f".model.onnx.{os.getpid()}-{tag}.abcdefgh.tmp", 2 * hour),  # this process
            _touch(tmp_path / f".model.onnx.{sleeper.pid}-{tag}.zyxwvuts.tmp", 2 * hour),  # a live writer
            _touch(tmp_path / ".index.4.faiss.k2j4h5g6.tmp"),                              # fresh, no pid
            _touch(tmp_path / f".items.4.jsonl.{_dead_pid()}-0badf00d.abcdefgh.tmp"),     # other host, fresh
            _touch(tmp_path / ".tmpZz99Yy"),                                               # fresh
            _touch(tmp_path / ".notes.tmp", 2 * hour),                                     # not our pattern
            _touch(tmp_path / "data.abcdefgh.tmp", 2 * hour),                              # not hidden
            _touch(tmp_path / ".hidden", 2 * hour),
        ]
        atomic_write_bytes(tmp_path / "index.json", b"{}")
        assert not [p for p in stale if p.exists()]
        assert all(p.exists() for p in kept)
        assert sweep_stale_temps(tmp_path) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_killed_atomic_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    target = tmp_path / "index.3.faiss"
    code = ("import sys; from ctxsim.io import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'partial')\n")
    p = subprocess.run([sys.executable, "-c", code, str(target)], env=_env(**{FAULT_ENV: "index.3.faiss:written"}),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    leftover = list(tmp_path.glob(".index.3.faiss.*.tmp"))
    assert len(leftover) == 1 and not target.exists()
    atomic_write_bytes(tmp_path / "index.json", b"{}")
    assert not leftover[0].exists()


def test_safetensors_artifacts_are_0644(tmp_path):
    mode = 0o666 & ~_umask()
    atomic_write_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(3)}, {"k": "v"})
    with atomic_path(tmp_path / "b.safetensors") as tmp:  # a writer that renames its own 0600 file onto tmp
        save_file({"w": torch.zeros(3)}, str(tmp))
    for name in ("a.safetensors", "b.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]


# ---- the sweep: every write point of every epoch ------------------------------------------------------------------
SWEEP = [f"{name}:{stage}#{n}" for n in range(1, EPOCHS + 1)
         for name in ("last.safetensors", "best.safetensors", "metrics.jsonl")
         for stage in ("created", "written", "replaced")] + [
    f"{name}:{stage}" for name in ("model.safetensors", "model.json") for stage in ("created", "written", "replaced")]


@pytest.mark.slow
@pytest.mark.parametrize("point", SWEEP)
def test_kill_at_any_write_point_resumes_exactly_or_refuses(runs, tmp_path, point):
    reference = runs[0] / "reference"
    rc, err = _finish(_train_killed_at(point, tmp_path / "run"))
    run = tmp_path / "run"
    if rc == 0:  # the point was not reached (best.safetensors not improved that often): an uninterrupted run
        assert_same_run(run, reference)
        return
    assert rc == -signal.SIGKILL, err[-2000:]
    if not (run / "checkpoints" / "last.safetensors").exists():
        rc, err = _finish(_cli("--resume", str(run)))
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        return
    resume(run)
    assert_same_run(run, reference)
