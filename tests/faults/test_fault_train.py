"""`ctxsim train` (a real subprocess) SIGKILLed at a seeded random point, then `--resume`d: the result equals the
uninterrupted run bit for bit (model.safetensors, model.json, best checkpoint, metrics), or, only when the kill came
before the first checkpoint commit, resume refuses with one line and exit 2 (and a fresh run into the folder gives
the same run). Whatever the kill left: a checkpoint is whole, metrics.jsonl is a prefix of the reference's, and
`ctxsim verify` passes only on the reference's final bytes. See fault_trials.TrainScenario."""
from __future__ import annotations

import pytest

import fault_trials as ft
from fault_trials import run_trial, trials


def test_the_run_passes_every_checkpoint_point(train_scenario):
    """The logged points of the uninterrupted run (what the kills are drawn from): three epochs' commits, then the
    final weights and card."""
    pts = train_scenario.points
    assert pts.count("last.safetensors:replaced") == ft.TRAIN_EPOCHS
    assert pts[-3:] == ["model.json:created", "model.json:written", "model.json:replaced"]
    assert pts.index("config.yaml:replaced") < train_scenario.first_commit


@pytest.mark.parametrize("i", trials("train"))
def test_killed_train_resumes_exactly_or_refuses(train_scenario, i):
    assert run_trial(train_scenario, i) in (ft.RESUMED, ft.REFUSED, ft.FINISHED)

