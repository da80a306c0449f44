"""The fault suite's trial logic, shared by tests/faults and benchmarks/fault_suite.py.

A *trial* runs one real ctxsim command (``python -m ctxsim.cli ...``, one thread) on a fresh copy of its inputs and
SIGKILLs it at a point drawn by ``random.Random`` from a fixed seed, of one of two kinds, alternating:

- ``point``: a named fault point (``CTXSIM_FAULT=<point>#<n>``, see ctxsim.io) drawn from the sequence of points an
  uninterrupted run of that command passes, recorded once per session by running it under a logging wrapper
  (:data:`_LOGGING_MAIN`, which wraps ``ctxsim.io.fault_point`` in the child process; ctxsim itself is unchanged);
- ``delay``: a wall-clock delay drawn from [0, the duration of that uninterrupted run], after which the parent
  sends SIGKILL (landing anywhere: imports, computation, a write, between writes).

Then it checks the invariants of docs/RELIABILITY.md on what the kill left, and completes the work (``--resume``, a
re-export, a re-run ``index add``) and checks that too. A violated invariant raises AssertionError naming the
trial (seed, trial number, kill); otherwise the trial returns its outcome (one of ``OUTCOMES``).

Each scenario (``TrainScenario``, ``ExportScenario``, ``IndexAddScenario``) is prepared once (inputs and the
uninterrupted reference run) and then runs any number of trials; ``plan(seed, command, n, ...)`` gives the same
kills in the same order everywhere, so a default test run's trials are the first ones of the full run's.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 20261206
FAULT_ENV = "CTXSIM_FAULT"
LOG_ENV = "CTXSIM_FAULT_SUITE_LOG"  # read by the logging wrapper below only, never by ctxsim
TIMEOUT_S = 600

# what a kill left (after which the work was completed and checked in every case)
OLD = "old artifact intact"                   # export, index add: exactly the previous valid folder
NEW = "new artifact complete"                 # export, index add: exactly the new valid folder
RESUMED = "resumed, equal to uninterrupted"   # train: a checkpoint survived; --resume gave the same bytes
REFUSED = "resume refused cleanly"            # train: killed before the first checkpoint; one line, exit 2
TORN = "torn publish, named by verify"        # export: killed between publish moves; verify exit 1, no verdict
FINISHED = "finished before the kill"         # a delay longer than that run
OUTCOMES = (OLD, NEW, RESUMED, REFUSED, TORN, FINISHED)

# `ctxsim ...` whose every fault point (ctxsim.io.fault_point) is appended to the file $CTXSIM_FAULT_SUITE_LOG.
# Patched before the CLI (and so ctxsim.export.publish's `from ctxsim.io import fault_point`) is imported.
_LOGGING_MAIN = f"""\
import os, sys
import ctxsim.io as _io
_orig, _log = _io.fault_point, os.environ["{LOG_ENV}"]
def _logged(name):
    with open(_log, "a") as f:
        f.write(name + "\\n")
    _orig(name)
_io.fault_point = _logged
sys.argv[0] = "ctxsim"
from ctxsim.cli.app import main
main()
"""


# ---------------------------------------------------------------------------------------------- processes
def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: one thread (same kernels as the reference run, so the same bits; and no
    oversubscription of a small machine), no inherited fault hook."""
    env = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, LOG_ENV)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def ctxsim(args: list[str], logs: Path, **env: str) -> subprocess.Popen:
    """Start ``python -m ctxsim.cli ARGS`` with stdout/stderr to files beside ``logs`` (``logs``.out/.err)."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:  # the child keeps its own descriptors
        return subprocess.Popen([sys.executable, "-m", "ctxsim.cli", *args], env=child_env(**env), stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, logs: Path) -> tuple[int, str]:
    """Wait for ``proc``; (exit status, its stderr)."""
    proc.wait(timeout=TIMEOUT_S)
    return proc.returncode, Path(f"{logs}.err").read_text(errors="replace")


def run_ok(args: list[str], logs: Path) -> tuple[int, str]:
    """Run ``ctxsim ARGS`` to its end: (exit status, stderr)."""
    return finish(ctxsim(args, logs), logs)


def discover(args: list[str], logs: Path) -> tuple[list[str], float, str]:
    """Run ``ctxsim ARGS`` uninterrupted under the logging wrapper: (the fault points it passed, in order; its wall
    time in seconds; stderr). Raises AssertionError unless it exits 0."""
    log = Path(f"{logs}.points")
    log.unlink(missing_ok=True)
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _LOGGING_MAIN, *args], env=child_env(**{LOG_ENV: str(log)}),
                           stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=TIMEOUT_S, check=False)
        duration = time.perf_counter() - t0
    stderr = Path(f"{logs}.err").read_text(errors="replace")
    assert p.returncode == 0, f"uninterrupted `ctxsim {' '.join(args)}` failed ({p.returncode}): {stderr[-2000:]}"
    points = log.read_text().splitlines() if log.exists() else []
    assert points, f"`ctxsim {' '.join(args)}` passed no fault point: the logging wrapper did not take"
    return points, duration, stderr


# ---------------------------------------------------------------------------------------------- kills
@dataclass(frozen=True)
class Kill:
    """Where a trial's process dies: ``point`` ("<name>#<n>", at position ``index`` of the uninterrupted run's
    sequence of points) or ``delay`` seconds after it was started."""

    kind: str                  # "point" | "delay"
    point: str | None = None
    index: int | None = None
    delay: float | None = None

    def __str__(self) -> str:
        return f"point {self.point} (#{self.index} of the run)" if self.kind == "point" else f"after {self.delay:.2f} s"


def plan(seed: int, command: str, n: int, points: list[str], duration: float) -> list[Kill]:
    """``n`` kills for ``command``: even trials at a named point, odd ones after a delay, both drawn from
    ``random.Random(f"{seed}:{command}")``. Points are dealt from a shuffled deck of the run's sequence (no point
    twice before every one came up); a delay is a uniform fraction of ``duration``. The first k kills of any n are
    the same (a delay's fraction too; its seconds scale with the duration measured in that session)."""
    rng = random.Random(f"{seed}:{command}")
    kills, deck = [], []
    for i in range(n):
        if i % 2 == 0:
            if not deck:
                deck = list(range(len(points)))
                rng.shuffle(deck)
            j = deck.pop()
            kills.append(Kill("point", f"{points[j]}#{points[:j + 1].count(points[j])}", index=j))
        else:
            kills.append(Kill("delay", delay=round(rng.random() * duration, 3)))
    return kills


def run_killed(args: list[str], kill: Kill, logs: Path) -> tuple[int, str]:
    """Run ``ctxsim ARGS`` and kill it as ``kill`` says; (exit status, stderr). A ``point`` kill must really die
    there (the points of an uninterrupted run are deterministic); a ``delay`` kill may find it already done (0)."""
    if kill.kind == "point":
        rc, err = finish(ctxsim(args, logs, **{FAULT_ENV: kill.point}), logs)
        assert rc == -signal.SIGKILL, f"not killed at {kill.point} (exit {rc}): {err[-2000:]}"
        return rc, err
    proc = ctxsim(args, logs)
    try:
        proc.wait(timeout=kill.delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    rc, err = finish(proc, logs)
    assert rc in (0, -signal.SIGKILL), f"exit {rc} before the kill: {err[-2000:]}"
    return rc, err


# ---------------------------------------------------------------------------------------------- checks
def verify_cli(path: Path) -> tuple[int, str]:
    """`ctxsim verify PATH` (the Typer command, in this process): (exit status, its output). A CtxsimError is what
    the entry point prints as one line with exit 2."""
    from typer.testing import CliRunner

    from ctxsim.cli.app import app
    from ctxsim.errors import CtxsimError

    res = CliRunner().invoke(app, ["verify", str(path)])
    if isinstance(res.exception, CtxsimError):
        return 2, str(res.exception)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"not one line: {err[-2000:]}"
    return lines[0]


class Scenario:
    """One command under kill -9: ``prepare()`` once, then ``trial(i, kill)`` as often as wanted."""

    command = ""

    def __init__(self, root: Path, seed: int = SEED) -> None:
        self.root, self.seed = Path(root), seed
        self.points: list[str] = []
        self.duration = 0.0

    def prepare(self) -> Scenario:
        raise NotImplementedError

    def kills(self, n: int) -> list[Kill]:
        return plan(self.seed, self.command, n, self.points, self.duration)

    def trial(self, i: int, kill: Kill) -> str:
        work = self.root / f"trial{i:03d}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            return self._trial(work, kill)
        except Exception as e:  # an invariant (AssertionError) or a reader refusing what the kill left
            what = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
            raise AssertionError(f"{self.command} trial {i} (seed {self.seed}, kill {kill}; in {work}): {what}") from e

    def _trial(self, work: Path, kill: Kill) -> str:
        raise NotImplementedError

    def cleanup(self, i: int) -> None:
        shutil.rmtree(self.root / f"trial{i:03d}", ignore_errors=True)


# ---------------------------------------------------------------------------------------------- train
TRAIN_EPOCHS = 3
TRAIN_SETS = [f"epochs={TRAIN_EPOCHS}", "data.batches_per_epoch=2", "eval_ks=[1]"]


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the throughput (a wall-clock figure)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [{k: v for k, v in json.loads(ln).items() if k != "images_per_s"} for ln in path.read_text().splitlines()
            if ln.strip()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Final weights (bytes), model card, best checkpoint, metrics history and last checkpoint equal the
    uninterrupted run's; no temporaries; nothing but the two checkpoint files."""
    import torch
    from safetensors.torch import load_file

    from ctxsim.train import read_best, read_checkpoint

    for name in ("model.safetensors", "model.json"):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from the reference"
    a = load_file(str(reference / "checkpoints/best.safetensors"))
    b = load_file(str(run / "checkpoints/best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "best.safetensors differs"
    assert read_best(run) == read_best(reference)
    assert _records(run) == _records(reference), "metrics.jsonl differs"
    assert read_checkpoint(run).epoch == TRAIN_EPOCHS
    assert not temporaries(run), temporaries(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]


class TrainScenario(Scenario):
    """`ctxsim train` (digits, 3 epochs of 2 batches, a checkpoint each epoch), killed, then `--resume`d."""

    command = "train"

    def args(self, run: Path) -> list[str]:
        return ["train", "--recipe", "digits-demo", *[a for s in TRAIN_SETS for a in ("--set", s)], "--out", str(run)]

    def prepare(self) -> TrainScenario:
        self.reference = self.root / "reference"
        shutil.rmtree(self.reference, ignore_errors=True)
        self.points, self.duration, _ = discover(self.args(self.reference), self.root / "reference-log")
        # the first commit: a kill before it leaves nothing to resume
        self.first_commit = self.points.index("last.safetensors:replaced")
        code, out = verify_cli(self.reference)
        assert code == 0, out
        return self

    def _trial(self, work: Path, kill: Kill) -> str:
        from ctxsim.train import read_checkpoint

        run = work / "run"
        rc, _ = run_killed(self.args(run), kill, work / "killed")
        if rc == 0:
            assert_same_run(run, self.reference)
            code, out = verify_cli(run)
            assert code == 0, out
            return FINISHED
        # what the kill left: a checkpoint, when there is one, is whole (the commit is one os.replace), the
        # metrics a prefix of the reference's, and a passing verify vouches only for the reference's final bytes
        last = run / "checkpoints" / "last.safetensors"
        committed = last.exists()
        if kill.kind == "point":
            assert committed == (kill.index >= self.first_commit), \
                f"checkpoint {'present' if committed else 'absent'} after a kill at point #{kill.index}"
        if committed:
            epoch = read_checkpoint(run).epoch
            assert 1 <= epoch <= TRAIN_EPOCHS
        history = _records(run)
        assert history == _records(self.reference)[:len(history)], "metrics.jsonl is not a prefix of the reference"
        if run.exists():
            code, out = verify_cli(run)
            assert code in (0, 1, 2), out
            if code == 0:
                assert (run / "model.safetensors").read_bytes() == (self.reference / "model.safetensors").read_bytes()
            elif code == 1:
                assert "model.safetensors" in out or "model.json" in out, out
            else:
                one_line(out)
        # resume: exact, or (only with no checkpoint) refused with one line, exit 2
        rc, err = run_ok(["train", "--resume", str(run)], work / "resume")
        if not committed:
            assert rc == 2, f"resume without a checkpoint: exit {rc}: {err[-2000:]}"
            line = one_line(err)
            assert "no complete checkpoint" in line or "not a run folder" in line, line
            rc, err = run_ok(self.args(run), work / "again")  # the one-line message's advice: start afresh
            assert rc == 0, err[-2000:]
            outcome = REFUSED
        else:
            assert rc == 0, f"resume failed ({rc}) with a checkpoint present: {err[-2000:]}"
            outcome = RESUMED
        assert_same_run(run, self.reference)
        code, out = verify_cli(run)
        assert code == 0, out
        return outcome


# ---------------------------------------------------------------------------------------------- export
EXPORT_LIMIT = 100  # parity images
PUBLISHED = ("model.onnx", "parity.json", "manifest.json")  # what an export with these flags publishes, in order
# the states a kill may leave (old/new owner of each of PUBLISHED): publishing moves them in this order
EXPORT_STATES = {("old", "old", "old"): OLD, ("new", "old", "old"): TORN, ("new", "new", "old"): TORN,
                 ("new", "new", "new"): NEW}


class ExportScenario(Scenario):
    """`ctxsim export RUN2 --out E --no-fp16 --limit 100` over E = RUN1's valid export, killed, then re-run."""

    command = "export"

    def args(self, out: Path) -> list[str]:
        return ["export", str(self.run2), "--out", str(out), "--no-fp16", "--limit", str(EXPORT_LIMIT)]

    def prepare(self) -> ExportScenario:
        from ctxsim.data.omniglot import MINI
        from ctxsim.export import export_run

        from export_helpers import make_run

        self.run1 = make_run(self.root / "run1", "convnet", MINI, seed=0)
        self.run2 = make_run(self.root / "run2", "convnet", MINI, seed=1)
        self.old = self.root / "old"
        shutil.rmtree(self.old, ignore_errors=True)
        assert export_run(self.run1, self.old, fp16=False, parity_limit=EXPORT_LIMIT).passed
        self.new = self.root / "new"
        shutil.rmtree(self.new, ignore_errors=True)
        shutil.copytree(self.old, self.new)
        self.points, self.duration, _ = discover(self.args(self.new), self.root / "new-log")
        self.fp = {who: self._owner_fps(folder) for who, folder in (("old", self.old), ("new", self.new))}
        assert self.fp["old"]["manifest.json"] != self.fp["new"]["manifest.json"]
        self.onnx_bytes = {who: (folder / "model.onnx").read_bytes() for who, folder in
                         (("old", self.old), ("new", self.new))}
        for folder in (self.old, self.new):
            assert sorted(p.name for p in folder.iterdir()) == sorted(PUBLISHED), list(folder.iterdir())
            code, out = verify_cli(folder)
            assert code == 0, out
        return self

    @staticmethod
    def _owner_fps(folder: Path) -> dict[str, str | None]:
        """The model fingerprint each published file is about."""
        from ctxsim.export.runners import artifact_contract

        parity = json.loads((folder / "parity.json").read_text()) if (folder / "parity.json").is_file() else {}
        manifest = json.loads((folder / "manifest.json").read_text())
        return {"model.onnx": artifact_contract(folder / "model.onnx").get("fingerprint"),
                "parity.json": (parity.get("model.onnx") or {}).get("fingerprint"),
                "manifest.json": manifest.get("fingerprint")}

    def state(self, folder: Path) -> tuple[str, ...]:
        """("old"|"new" per file of PUBLISHED): whose file it is; AssertionError for a file of neither."""
        got = self._owner_fps(folder)
        owners = []
        for name in PUBLISHED:
            who = [w for w in ("old", "new") if self.fp[w][name] == got[name]]
            assert len(who) == 1, f"{name} is of model {got[name]}, neither RUN1's nor RUN2's"
            owners.append(who[0])
        # an artifact is the old or the new bytes, whole (not merely of the right model)
        onnx = (folder / "model.onnx").read_bytes()
        assert onnx == self.onnx_bytes[owners[0]], "model.onnx is neither RUN1's nor RUN2's exported bytes"
        return tuple(owners)

    def check_verdicts(self, folder: Path) -> None:
        """No verdict vouches for bytes it was not computed on: every parity record, manifest summary and manifest
        hash that matches the bytes beside it is of the model those bytes are; `recorded_verdict` says "passed"
        only then."""
        from ctxsim.export.parity import recorded_verdict
        from ctxsim.export.runners import artifact_contract
        from ctxsim.io import sha256_file

        onnx = folder / "model.onnx"
        sha, fp = sha256_file(onnx), artifact_contract(onnx).get("fingerprint")
        record = json.loads((folder / "parity.json").read_text()).get("model.onnx") or {}
        manifest = json.loads((folder / "manifest.json").read_text())
        bound = record.get("sha256") == sha
        if bound:
            assert record.get("fingerprint") == fp, "a parity record of these bytes names another model"
        verdict, _ = recorded_verdict(onnx)
        assert verdict is (record.get("passed") if bound else None), \
            f"recorded_verdict {verdict} for model.onnx whose parity record is {'of' if bound else 'NOT of'} its bytes"
        summary = (manifest.get("parity") or {}).get("model.onnx") or {}
        if summary.get("sha256") == sha or manifest["artifacts"]["model.onnx"]["sha256"] == sha:
            assert manifest.get("fingerprint") == fp, "manifest.json binds these bytes to another model"

    def _trial(self, work: Path, kill: Kill) -> str:
        from ctxsim.deploy import Embedder
        from ctxsim.errors import ArtifactError

        folder = work / "E"
        shutil.copytree(self.old, folder)
        rc, _ = run_killed(self.args(folder), kill, work / "killed")
        state = self.state(folder)
        assert rc != 0 or state == ("new",) * 3, f"exit 0 but the published files are in state {state}"
        assert state in EXPORT_STATES, f"published files in state {state}: not a prefix of the publishing order"
        self.check_verdicts(folder)
        code, out = verify_cli(folder)
        if state in (("old",) * 3, ("new",) * 3):
            assert code == 0, f"state {state} but verify exits {code}: {out}"
            outcome = EXPORT_STATES[state] if rc != 0 else FINISHED
        else:  # moved model.onnx (and parity.json) but not the manifest: refused and named, never trusted
            assert code == 1 and "model.onnx" in out, f"torn state {state} but verify exits {code}: {out}"
            try:
                Embedder.from_artifact(folder / "model.onnx", device="cpu")
            except ArtifactError as e:
                assert "manifest.json" in str(e), e
            else:
                raise AssertionError("the Embedder opened a model.onnx the manifest beside it does not bind")
            outcome = TORN
        # the next export publishes RUN2's complete folder, and removes what the killed one left
        rc, err = run_ok(self.args(folder), work / "again")
        assert rc == 0, err[-2000:]
        assert self.state(folder) == ("new",) * 3
        self.check_verdicts(folder)
        code, out = verify_cli(folder)
        assert code == 0, out
        assert sorted(p.name for p in folder.iterdir()) == sorted(PUBLISHED), sorted(p.name for p in folder.iterdir())
        return outcome


# ---------------------------------------------------------------------------------------------- index add
INDEX_CLASSES, INDEX_EXTRA = (0, 1), (2,)  # Omniglot-mini evaluation characters (20 drawings each)


def write_gallery(root: Path, classes: tuple[int, ...]) -> Path:
    """The drawings of ``classes`` of the shipped Omniglot sample as root/<class>/<n>.png."""
    import numpy as np

    from ctxsim.data.omniglot import MINI, omniglot

    ds = omniglot(MINI, "evaluation")
    labels = np.asarray(ds.labels)
    for c in classes:
        d = root / ds.class_names[c].replace("/", "__")
        d.mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c):
            ds.load_image(int(i)).save(d / f"{int(i)}.png")
    return root


class IndexAddScenario(Scenario):
    """`ctxsim index add IDX EXTRA` on a flat index of N items, killed, then re-run."""

    command = "index add"

    def args(self, idx: Path) -> list[str]:
        return ["index", "add", str(idx), str(self.extra)]

    def prepare(self) -> IndexAddScenario:
        from ctxsim.deploy import build_index, load_index

        from export_helpers import make_run

        for p in ("run", "gallery", "extra", "old", "new"):
            shutil.rmtree(self.root / p, ignore_errors=True)
        run_dir = make_run(self.root / "run", "convnet", seed=0)
        gallery = write_gallery(self.root / "gallery", INDEX_CLASSES)
        self.extra = write_gallery(self.root / "extra", INDEX_EXTRA)
        self.old = self.root / "old"
        build_index(gallery, run_dir, self.old, "flat")
        self.new = self.root / "new"
        shutil.copytree(self.old, self.new)
        self.points, self.duration, _ = discover(self.args(self.new), self.root / "new-log")
        self.ref = {who: self._snapshot(load_index(folder)) for who, folder in (("old", self.old), ("new", self.new))}
        self.n, self.added = self.ref["old"][0], self.ref["new"][0] - self.ref["old"][0]
        assert self.n > 0 and self.added > 0
        for folder in (self.old, self.new):
            code, out = verify_cli(folder)
            assert code == 0, out
        return self

    @staticmethod
    def _snapshot(idx: Any) -> tuple[int, list, bytes, int]:
        import numpy as np

        emb = np.ascontiguousarray(np.asarray(idx.embeddings, np.float32))
        return idx.count, [(it.id, it.path, it.label) for it in idx.items], emb.tobytes(), int(idx.backend.ntotal)

    def _trial(self, work: Path, kill: Kill) -> str:
        from ctxsim.deploy import load_index

        folder = work / "IDX"
        shutil.copytree(self.old, folder)
        killed_rc, _ = run_killed(self.args(folder), kill, work / "killed")
        got = self._snapshot(load_index(folder))  # every file sha256-verified against index.json
        who = [w for w in ("old", "new") if self.ref[w] == got]
        assert killed_rc != 0 or who == ["new"], "exit 0 but the index is not the new one"
        assert who, (f"the index holds {got[0]} items ({got[3]} vectors), neither the old {self.n} nor the new "
                     f"{self.n + self.added}, or its item table / embeddings are of neither")
        code, out = verify_cli(folder)
        assert code == 0, out
        # re-running the add completes: N + added more, on whichever index the kill left
        rc, err = run_ok(self.args(folder), work / "again")
        assert rc == 0, err[-2000:]
        after = self._snapshot(load_index(folder))
        assert after[0] == got[0] + self.added == after[3], (after[0], after[3], got[0])
        if who[0] == "old":
            assert after == self.ref["new"], "the completed add differs from an uninterrupted one"
        else:
            assert after[1][:got[0]] == got[1], "the re-run add changed the existing items"
        code, out = verify_cli(folder)
        assert code == 0, out
        meta = json.loads((folder / "index.json").read_text())
        assert sorted(p.name for p in folder.iterdir()) == sorted([".lock", "index.json", *meta["files"].values()]), \
            "superseded generations or temporaries left behind"
        return FINISHED if killed_rc == 0 else OLD if who[0] == "old" else NEW


SCENARIOS = {"train": TrainScenario, "export": ExportScenario, "index add": IndexAddScenario}


# ---------------------------------------------------------------------------------------------- pytest counts
# The default test run takes the first DEFAULT_TRIALS[command] trials of each command's seeded plan (about 2 minutes
# for tests/faults on 2 cores); the `slow` tests the rest, up to $CTXSIM_FAULT_TRIALS per command (default 24).
DEFAULT_TRIALS = {"train": 2, "export": 3, "index add": 3}
FULL_TRIALS = int(os.environ.get("CTXSIM_FAULT_TRIALS", "24"))
TEST_SEED = int(os.environ.get("CTXSIM_FAULT_SEED", str(SEED)))


def trials(command: str) -> list:
    """The trial numbers of ``command`` as pytest parameters: the first few in the default run, the rest ``slow``."""
    import pytest

    first = min(DEFAULT_TRIALS[command], FULL_TRIALS)
    return [pytest.param(i, marks=() if i < first else pytest.mark.slow) for i in range(FULL_TRIALS)]


def run_trial(scenario: Scenario, i: int) -> str:
    """(For the tests.) Trial ``i`` of the scenario's seeded plan; its folder is removed when it passes (kept when
    it fails)."""
    kill = scenario.kills(FULL_TRIALS)[i]
    outcome = scenario.trial(i, kill)
    print(f"{scenario.command} trial {i}: kill {kill} -> {outcome}")
    scenario.cleanup(i)
    assert outcome in OUTCOMES
    return outcome
