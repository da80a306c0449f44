"""`ctxsim index add IDX EXTRA` (a real subprocess) on a flat index of N items, SIGKILLed at a seeded random point:
the index then loads (every file sha256-verified against index.json) with exactly the old N items or the new N + M
(item table, embeddings and FAISS vectors all of one generation), `ctxsim verify IDX` exits 0, and re-running the add
completes (N + M after an old one, equal to an uninterrupted add) leaving no superseded generation or temporary.
See fault_trials.IndexAddScenario."""
from __future__ import annotations

import pytest

import fault_trials as ft
from fault_trials import run_trial, trials


def test_the_add_passes_every_generation_point(index_scenario):
    pts = index_scenario.points
    assert pts[-1] == "index.json:replaced"  # the commit point, last
    assert {p.split(":")[0] for p in pts} == {"index.2.faiss", "items.2.jsonl", "embeddings.2.npy", "index.json"}


@pytest.mark.parametrize("i", trials("index add"))
def test_killed_index_add_leaves_old_or_new_index(index_scenario, i):
    assert run_trial(index_scenario, i) in (ft.OLD, ft.NEW, ft.FINISHED)

