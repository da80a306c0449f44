"""Typed checks of settings and records (ctxsim.schema) and of training configs: one line and exit 2, never a
traceback, for any value of any setting (issue 11 section 5)."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from ctxsim.config import load_yaml, recipe_path, resolve_config
from ctxsim.errors import ArtifactError, ConfigError, CtxsimError
from ctxsim.schema import check, check_fields

from hostile_helpers import assert_one_line, mutated, run_main


# ---------------------------------------------------------------------------------------------- ctxsim.schema
@dataclass
class _Inner:
    size: int
    name: str = "x"


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=lambda: _Inner(1))
    mode: Literal["a", "b"] = "a"
    scale: tuple[float, float] = (0.1, 1.0)
    ks: list[int] = field(default_factory=list)
    limit: int | None = None


class _Req(TypedDict):
    sha256: str


class _Rec(_Req, total=False):
    bytes: int


@pytest.mark.parametrize("value, type_, expected", [
    (3, int, 3), ("4", int, 4), (2, float, 2.0), ("3e-4", float, 3e-4), (True, bool, True), (None, int | None, None),
    ([1, 2], tuple[float, float], (1.0, 2.0)), ([1, "2"], list[int], [1, 2]), ("b", Literal["a", "b"], "b"),
    ({"k": 1}, dict[str, int], {"k": 1}), (7, Any, 7),
])
def test_check_accepts_and_converts(value, type_, expected):
    got = check(value, type_, "s", lenient=True)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, type_, words", [
    (True, int, "must be an integer, got True"),          # bool is not an int
    ("600", int, "must be an integer, got '600'"),        # strict: a JSON string is not a count
    ([1], float, "must be a number, got [1]"),
    (float("nan"), float, "must be a finite number"),
    (1, bool, "must be true or false"),
    (1, Literal["a", "b"], "must be one of 'a', 'b', got 1"),
    ([1, 2, 3], tuple[float, float], "must be a list of 2 values"),
    (None, dict[str, str], "must be a mapping, got None"),
    ({"a": None}, dict[str, str], "s.a must be a string, got None"),
    ([1, "x"], list[int], "s[1] must be an integer, got 'x'"),
    ("one", int | None, "must be an integer or null, got 'one'"),
])
def test_check_refuses_with_one_line(value, type_, words):
    with pytest.raises(ConfigError) as e:
        check(value, type_, "s")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_check_names_the_file_and_the_fix():
    with pytest.raises(ArtifactError, match=r"^idx/index.json: count must be an integer, got '600'; rebuild it$"):
        check("600", int, "count", error=ArtifactError, where="idx/index.json", hint="rebuild it")


def test_dataclasses_refuse_unknown_and_missing_keys_and_check_nested_types():
    assert check({"inner": {"size": 2}, "scale": [0.5, 1]}, _Outer, "cfg") == _Outer(_Inner(2), scale=(0.5, 1.0))
    with pytest.raises(ConfigError, match="unknown setting cfg.colour"):
        check({"colour": 1}, _Outer, "cfg")
    with pytest.raises(ConfigError, match="cfg.inner lacks 'size'"):
        check({"inner": {}}, _Outer, "cfg")
    with pytest.raises(ConfigError, match=r"cfg.inner.size must be an integer, got \[2\]"):
        check({"inner": {"size": [2]}}, _Outer, "cfg")


def test_typeddicts_check_required_and_known_keys_and_keep_others():
    assert check({"sha256": "ab", "bytes": 3, "extra": [1]}, _Rec, "e") == {"sha256": "ab", "bytes": 3, "extra": [1]}
    with pytest.raises(ConfigError, match="e lacks 'sha256'"):
        check({"bytes": 3}, _Rec, "e")
    with pytest.raises(ConfigError, match="e.sha256 must be a string, got None"):
        check({"sha256": None}, _Rec, "e")
    assert check_fields(_Outer, {"mode": "b", "other": 1}) == {"mode": "b"}


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("overrides, words", [
    ({"epochs": [1, 2]}, "epochs must be an integer, got [1, 2]"),
    ({"epochs": True}, "epochs must be an integer, got True"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"optim": {"lr": [1]}}, "optim.lr must be a number, got [1]"),
    ({"optim": {"lr": None}}, "optim.lr must be a number, got None"),      # --set optim.lr=
    ({"optim": {"lr": -1}}, "optim.lr must be > 0"),
    ({"optim": {"optimizer": "sgd"}}, "optim.optimizer must be one of 'adam', 'adamw', got 'sgd'"),
    ({"data": {"train_scale": [0.5]}}, "data.train_scale must be a list of 2 values"),
    ({"data": {"train_scale": [0.9, 0.5]}}, "data.train_scale must be [low, high]"),
    ({"data": {"m": "four"}}, "data.m must be an integer, got 'four'"),
    ({"model": {"embedding_dim": "x"}}, "model.embedding_dim must be an integer, got 'x'"),
    ({"preprocess": {"mean": ["a"]}}, "preprocess.mean[0] must be a number, got 'a'"),
    ({"loss": {"params": {1: 2}}}, "loss.params key must be a string, got 1"),
    ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ({"seed": -1}, "seed must be in [0, 2**32)"),
    ({"eval_ks": []}, "eval_ks must be a non-empty list"),
    ({"optim": 3}, "setting optim must be a mapping, got 3"),
])
def test_bad_settings_are_one_line_config_errors(overrides, words):
    with pytest.raises(ConfigError) as e:
        resolve_config("omniglot-mini", None, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_numbers_written_as_strings_by_yaml_still_parse():
    cfg = resolve_config("omniglot-mini", None, {"optim": {"lr": "3e-4"}, "epochs": "3"})
    assert cfg.optim.lr == 3e-4 and cfg.epochs == 3


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctxsim.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.parametrize("args, words", [
    (["--set", "epochs=[1,2]"], "epochs must be an integer, got [1, 2]"),
    (["--set", "optim.lr="], "optim.lr must be a number, got None"),
    (["--set", "epochs=true"], "epochs must be an integer, got True"),
])
def test_the_cli_answers_bad_settings_with_one_line_and_exit_2(tmp_path, args, words):
    proc = _cli("train", "--recipe", "omniglot-mini", "--out", str(tmp_path / "run"), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {words}"
    assert not (tmp_path / "run").exists()


def test_yaml_config_files_with_bad_types_are_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("optim: {lr: [1]}\nepochs: [1, 2]\n")
    proc = _cli("train", "--recipe", "omniglot-mini", "--config", str(tmp_path / "c.yaml"), "--check")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "must be" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- property
MINI = load_yaml(recipe_path("omniglot-mini"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(MINI))
def test_any_mutated_config_resolves_or_is_a_config_error(doc):
    """The property at the level of the settings: never a TypeError, KeyError, ... from a value of any type."""
    try:
        resolve_config(None, None, doc)
    except CtxsimError as e:
        assert "\n" not in str(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(doc=mutated({k: v for k, v in MINI.items() if k != "epochs"}))
def test_any_mutated_config_file_trains_one_step_or_exits_2_with_one_line(doc, tmp_path, capsys, monkeypatch):
    """End to end through the CLI's own error handling (ctxsim.cli.app.main): `ctxsim train --config F --check`
    on a mutated recipe either runs its step or prints one line and exits 2; anything else escapes as a traceback
    and fails the test."""
    import torch

    path = tmp_path / "mutated.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        code, err = run_main(["train", "--config", path, "--check"], capsys, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(False)  # a mutated config may have set it in this process
    assert_one_line(code, err)
