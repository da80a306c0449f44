"""Hostile-input helpers shared by the property tests: any-JSON mutations of a valid document, and running the CLI in
this process through ``main`` (its CtxsimError handling included) to see what a user would see."""
from __future__ import annotations

import copy
import sys
from typing import Any

from hypothesis import strategies as st

JSON_LEAVES = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True)
               | st.text(max_size=6) | st.sampled_from(["", "0", "3e-4", "none", "cuda", "L", "hybrid", "flat"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=5)


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested document (list items included)."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(paths(v, prefix + (k,)))
    return out


@st.composite
def mutated(draw: Any, doc: dict) -> dict:
    """``doc`` with one to three values replaced by any JSON value, keys deleted or unknown keys added."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        where = paths(doc)
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(JSON_VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=5))] = draw(JSON_VALUES)
    return doc


def run_main(argv: list[str], capsys: Any, monkeypatch: Any) -> tuple[int, str]:
    """``ctxsim <argv>`` in this process through ``main``: (exit code, stderr). Any exception other than the ones
    ``main`` turns into an exit code escapes, as the traceback a user would see."""
    from ctxsim.cli.app import main

    monkeypatch.setattr(sys, "argv", ["ctxsim", *map(str, argv)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, allowed: tuple[int, ...] = (0, 2)) -> None:
    """The exit code is one of ``allowed``; an error exit (2) printed exactly one ``error:`` line."""
    assert code in allowed, err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
