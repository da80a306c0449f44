"""`ctxsim export RUN2 --out E` (a real subprocess) over E = RUN1's valid export, SIGKILLed at a seeded random point.

From export/publish.py: everything is built in E/.staging-*, then moved into E in the order model.onnx,
parity.json, manifest.json (the commit point). So a kill leaves E exactly RUN1's export (before the first move:
`ctxsim verify` exit 0), exactly RUN2's (after the manifest: exit 0), or, between moves, RUN2's model.onnx (and
parity.json) beside RUN1's manifest: verify exits 1 naming model.onnx and the Embedder refuses it. Never a file of
neither run, never a parity verdict or manifest hash vouching for bytes it was not computed on. The next export
publishes RUN2's complete folder and removes the staging left behind. See fault_trials.ExportScenario."""
from __future__ import annotations

import pytest

import fault_trials as ft
from fault_trials import run_trial, trials


def test_the_export_passes_every_publish_point(export_scenario):
    pts = export_scenario.points
    assert pts[-3:] == [f"publish:{n}" for n in ft.PUBLISHED]  # the order the states below assume
    assert "manifest.json:replaced" in pts and "parity.json:replaced" in pts


@pytest.mark.parametrize("i", trials("export"))
def test_killed_export_leaves_old_or_new_or_a_named_mismatch(export_scenario, i):
    run_trial(export_scenario, i)

