"""The thread policy (ctxsim.deploy.threads): applied to PyTorch, FAISS and ONNX Runtime sessions, read back."""
from __future__ import annotations

import pytest
import torch

from ctxsim.errors import ConfigError


@pytest.fixture
def restore_threads():
    """Put PyTorch's and the policy's state back after a test that changes them."""
    from ctxsim.deploy import threads

    before, applied = torch.get_num_threads(), threads._applied
    yield
    torch.set_num_threads(before)
    if applied is not None:
        threads.set_threads(applied.threads)
    threads._applied = applied


def _ort_settings(embedder) -> tuple[int, int, str, str]:
    session = embedder._b.runner.session
    opts = session.get_session_options()
    return (opts.intra_op_num_threads, opts.inter_op_num_threads,
            opts.get_session_config_entry("session.intra_op.allow_spinning"),
            opts.get_session_config_entry("session.inter_op.allow_spinning"))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory, other_run_dir):
    from ctxsim.export import export_onnx

    return export_onnx(other_run_dir, tmp_path_factory.mktemp("threads") / "exp").onnx_path


@pytest.mark.parametrize("n", [1, 2])
def test_set_threads_reaches_torch_faiss_and_onnxruntime(n, onnx_model, restore_threads):
    faiss = pytest.importorskip("faiss")
    from ctxsim.deploy import Embedder
    from ctxsim.deploy.threads import current_policy, set_threads

    policy = set_threads(n)
    assert (policy.threads, policy.interop, policy.spin, policy.decode) == (n, 1, False, n)
    assert current_policy() == policy
    assert torch.get_num_threads() == n
    assert faiss.omp_get_max_threads() == n
    emb = Embedder.from_artifact(onnx_model, device="cpu")  # no threads=: the policy in force
    assert emb.threads == policy
    assert _ort_settings(emb) == (n, 1, "0", "0")  # no spin-waiting pool competing with the event loop


def test_embedder_threads_argument_applies_the_policy(onnx_model, restore_threads):
    faiss = pytest.importorskip("faiss")
    from ctxsim.deploy import Embedder
    from ctxsim.deploy.threads import set_threads

    set_threads(2)
    emb = Embedder.from_artifact(onnx_model, device="cpu", threads=1)
    assert emb.threads.threads == 1 and torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert _ort_settings(emb)[:2] == (1, 1)


def test_defaults_never_exceed_the_usable_cores(monkeypatch):
    import os

    from ctxsim.deploy.threads import ENV_THREADS, resolve_threads, usable_cores

    monkeypatch.delenv(ENV_THREADS, raising=False)
    cores = usable_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)
    assert resolve_threads().threads == cores
    assert resolve_threads(reserve=1).threads == max(1, cores - 1)  # the server keeps a core for its event loop
    assert resolve_threads(reserve=64).threads == 1
    monkeypatch.setenv(ENV_THREADS, "3")
    assert resolve_threads().threads == 3 and resolve_threads(reserve=1).threads == 3  # an explicit choice is kept
    monkeypatch.setenv(ENV_THREADS, "many")
    with pytest.raises(ConfigError, match=ENV_THREADS):
        resolve_threads()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="threads"):
            resolve_threads(bad)


def test_cgroup_quota_lowers_the_core_count(monkeypatch):
    from ctxsim.deploy import threads

    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: 0.5)
    assert threads.usable_cores() == 1
    monkeypatch.setattr(threads, "_cgroup_cpus", lambda: None)
    assert threads.usable_cores() >= 1


def test_server_applies_the_policy(flat_index, restore_threads):
    faiss = pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from ctxsim.deploy import create_app

    app = create_app(flat_index, reload_every_s=0, device="cpu", threads=1)
    policy = app.state.ctxsim.threads
    assert policy.threads == 1 and app.state.batcher.decode_threads == 1
    assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert app.state.batcher.embedder.threads == policy


def test_serve_passes_threads_and_keeps_the_access_log_off(monkeypatch, flat_index, restore_threads):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from ctxsim.deploy.serve import serve

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    serve(flat_index, device="cpu", threads=1, reload_every_s=0)
    assert seen["access_log"] is False and seen["app"].state.ctxsim.threads.threads == 1
    serve(flat_index, device="cpu", threads=1, reload_every_s=0, access_log=True)
    assert seen["access_log"] is True
