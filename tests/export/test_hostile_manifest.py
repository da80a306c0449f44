"""manifest.json and parity.json as a hostile user writes them: `ctxsim verify` answers (0, 1 naming the problem,
or 2 with one line) and opening the artifact either works or refuses with one line; never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxsim.errors import CtxsimError

from hostile_helpers import assert_one_line, mutated, run_main

PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def published(tmp_path_factory, convnet_run) -> Path:
    from ctxsim.export import export_run

    out = tmp_path_factory.mktemp("published") / "export"
    assert export_run(convnet_run, out, parity_limit=60).passed
    return out


def _copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"artifacts": {"model.onnx": {"sha256": None}}}, "model.onnx.sha256 must be a string, got None"),
    ({"artifacts": []}, "artifacts must be a mapping, got []"),
    ({"fingerprint": 7}, "fingerprint must be a string, got 7"),
    ({"manifest_version": 99}, "newer ctxsim"),
])
def test_damaged_manifest_is_refused_with_one_line(tmp_path, published, changes, words):
    from ctxsim.export import check_artifact

    folder = _copy(published, tmp_path / "e")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CtxsimError) as e:
        check_artifact(folder / "model.onnx")
    assert words in str(e.value) and "\n" not in str(e.value)


@PROPERTY
@given(data=st.data())
def test_any_mutated_manifest_or_parity_record_is_answered(data, published, tmp_path, capsys, monkeypatch):
    from ctxsim.export import check_artifact

    folder = _copy(published, tmp_path / "e")
    name = data.draw(st.sampled_from(["manifest.json", "parity.json"]))
    doc = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps(data.draw(mutated(doc))))
    try:
        check_artifact(folder / "model.onnx")
    except CtxsimError as e:
        assert "\n" not in str(e)
    code, err = run_main(["verify", folder], capsys, monkeypatch)
    assert_one_line(code, err, allowed=(0, 1, 2))
