"""Fixtures of the fault suite: each command's scenario (inputs and the uninterrupted reference run, with the fault
points it passes), prepared once per session; the trial logic is in fault_trials.py (shared with
benchmarks/fault_suite.py).

Trial counts and seed: see ``fault_trials.DEFAULT_TRIALS`` (``$CTXSIM_FAULT_TRIALS``, ``$CTXSIM_FAULT_SEED``).
"""
from __future__ import annotations

import pytest

import fault_trials as ft


@pytest.fixture(scope="session")
def one_thread():
    """This process embeds and verifies with one thread too (as the children do), on a small shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scenario(command: str, tmp_path_factory) -> ft.Scenario:
    return ft.SCENARIOS[command](tmp_path_factory.mktemp(command.replace(" ", "_")), seed=ft.TEST_SEED).prepare()


@pytest.fixture(scope="session")
def train_scenario(tmp_path_factory, one_thread) -> ft.TrainScenario:
    return _scenario("train", tmp_path_factory)


@pytest.fixture(scope="session")
def export_scenario(tmp_path_factory, one_thread) -> ft.ExportScenario:
    return _scenario("export", tmp_path_factory)


@pytest.fixture(scope="session")
def index_scenario(tmp_path_factory, one_thread) -> ft.IndexAddScenario:
    return _scenario("index add", tmp_path_factory)
