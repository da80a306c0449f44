"""Run folders are checked when opened: weights whose bytes are not the ones model.json records are refused with
one line, never served; `ctxsim.verify.verify_run` reports the same checks (sha256, fingerprint, architecture)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctxsim.data.transforms import Preprocess
from ctxsim.errors import ArtifactError
from ctxsim.io import sha256_file
from ctxsim.nets import EmbeddingNet, ModelSpec, load_run, save_model
from ctxsim.verify import FAIL, NONE, OK, verify_run


def flip_tensor_bytes(path: Path) -> None:
    """Overwrite 4 aligned bytes in the middle of a safetensors file's tensor data with 0xFF (a float32 NaN),
    the header left intact."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    at = start + (len(data) - start) // 8 * 4
    data[at:at + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))


@pytest.fixture()
def run(tmp_path) -> Path:
    torch.manual_seed(0)
    net = EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=16, frozen_bn=False))
    save_model(tmp_path, net, Preprocess.greyscale(28, 28))
    return tmp_path


def _status(checks, check_prefix: str) -> str:
    return next(c.status for c in checks if c.check.startswith(check_prefix))


def test_model_json_records_the_weights_sha256(run):
    card = json.loads((run / "model.json").read_text())
    assert card["weights_sha256"] == sha256_file(run / "model.safetensors")
    assert load_run(run)[1].weights_sha256 == card["weights_sha256"]
    checks = verify_run(run)
    assert all(c.status == OK for c in checks), checks


def test_flipped_weight_bytes_are_refused_with_one_line(run):
    flip_tensor_bytes(run / "model.safetensors")
    with pytest.raises(ArtifactError, match="does not match the sha256 recorded in model.json") as e:
        load_run(run)
    assert "\n" not in str(e.value)
    checks = verify_run(run)
    assert _status(checks, "sha256") == FAIL and _status(checks, "fingerprint") == FAIL


def test_old_run_folder_without_a_hash_is_checked_by_its_fingerprint(run):
    """A run folder of an older ctxsim has no weights_sha256: its tensors are checked against the fingerprint."""
    card = json.loads((run / "model.json").read_text())
    del card["weights_sha256"]
    (run / "model.json").write_text(json.dumps(card))
    load_run(run)  # intact: accepted
    checks = verify_run(run)
    assert _status(checks, "sha256") == NONE and "no hash recorded" in checks[1].detail
    assert _status(checks, "fingerprint") == OK and not [c for c in checks if c.status == FAIL]

    flip_tensor_bytes(run / "model.safetensors")
    with pytest.raises(ArtifactError, match=f"not model {card['fingerprint']} that model.json records"):
        load_run(run)
    assert _status(verify_run(run), "fingerprint") == FAIL


def test_weights_of_another_model_are_refused(run, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    torch.manual_seed(1)
    save_model(other, EmbeddingNet(ModelSpec(backbone="convnet", in_channels=1, embedding_dim=16, frozen_bn=False)),
               Preprocess.greyscale(28, 28))
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # header and data intact
    with pytest.raises(ArtifactError, match="damaged or replaced"):
        load_run(run)


def test_verify_run_names_a_stale_eval_json(run):
    (run / "eval.json").write_text(json.dumps({"metrics": {}, "fingerprint": "0123456789abcdef"}))
    bad = [c for c in verify_run(run) if c.status == FAIL]
    assert [c.item for c in bad] == [f"{run}/eval.json"] and "0123456789abcdef" in bad[0].detail
