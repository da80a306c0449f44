"""Faults survived: N trials per command of `ctxsim train`, `ctxsim export` and `ctxsim index add` (real
subprocesses) SIGKILLed at seeded random points, with the invariants of docs/RELIABILITY.md checked after each.

    python benchmarks/fault_suite.py                     # 10 trials per command (about 10 minutes on 2 cores)
    python benchmarks/fault_suite.py --trials 24 --commands export "index add"

The trials are those of tests/faults (the same helpers, tests/faults/fault_trials.py, and the same seeded plan:
even trials at a named CTXSIM_FAULT point of the command, odd ones after a wall-clock delay in [0, an uninterrupted
run's duration]); a violated invariant is counted as a failure with its reproduction (seed, trial, kill) instead of
stopping the run. Writes benchmarks/results/faults.md and faults.json (and the same under $OUT when set).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "faults")]
import fault_trials as ft  # noqa: E402
from common import RESULTS, machine, markdown_table  # noqa: E402

COLUMNS = [ft.OLD, ft.NEW, ft.RESUMED, ft.REFUSED, ft.TORN, ft.FINISHED, "failures"]


def run_command(command: str, trials: int, seed: int, work: Path, keep: bool) -> dict:
    t0 = time.perf_counter()
    scenario = ft.SCENARIOS[command](work / command.replace(" ", "_"), seed=seed).prepare()
    prepare_s = time.perf_counter() - t0
    print(f"{command}: {len(scenario.points)} fault points, uninterrupted run {scenario.duration:.1f} s "
          f"(prepared in {prepare_s:.0f} s)", flush=True)
    rows = []
    for i, kill in enumerate(scenario.kills(trials)):
        t = time.perf_counter()
        try:
            outcome, error = scenario.trial(i, kill), None
        except AssertionError as e:
            outcome, error = "failures", str(e)
        except Exception as e:  # noqa: BLE001 - a crash of the harness or of a check is a failure to report too
            outcome, error = "failures", f"{type(e).__name__}: {e}"
        rows.append({"trial": i, "kind": kill.kind, "point": kill.point, "point_index": kill.index,
                     "delay_s": kill.delay, "outcome": outcome, "error": error,
                     "seconds": round(time.perf_counter() - t, 1)})
        print(f"  trial {i:2d}: kill {kill} -> {outcome}" + (f"\n    {error}" if error else ""), flush=True)
        if error is None and not keep:
            scenario.cleanup(i)
    return {"points": scenario.points, "uninterrupted_s": round(scenario.duration, 2), "trials": rows}


def summarise(results: dict) -> list[list]:
    table = []
    for command, res in results.items():
        for kind in ("point", "delay", "all"):
            rows = [r for r in res["trials"] if kind in ("all", r["kind"])]
            if not rows:
                continue
            counts = [sum(r["outcome"] == c for r in rows) for c in COLUMNS]
            table.append([f"`{command}`" if kind != "all" else f"**`{command}`**",
                          {"point": "named point", "delay": "wall-clock delay", "all": "**all**"}[kind],
                          len(rows), *[n or "" for n in counts[:-1]], counts[-1]])
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10, help="Trials per command (default 10).")
    ap.add_argument("--seed", type=int, default=ft.SEED)
    ap.add_argument("--commands", nargs="+", default=list(ft.SCENARIOS), choices=list(ft.SCENARIOS))
    ap.add_argument("--work", help="Folder for the trials (default: a temporary folder, removed afterwards).")
    ap.add_argument("--keep", action="store_true", help="Keep every trial's folder (failed ones are always kept).")
    ap.add_argument("--out-dir", help="Where to write faults.md/.json (default benchmarks/results, and $OUT).")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctxsim-faults-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        results = {c: run_command(c, args.trials, args.seed, work, args.keep) for c in args.commands}
        failed = [(c, r) for c, res in results.items() for r in res["trials"] if r["error"]]
        if failed and not args.work:  # keep the evidence: the failed trials' folders
            import shutil

            kept = Path(tempfile.mkdtemp(prefix="ctxsim-faults-failed-"))
            for c, r in failed:
                src = work / c.replace(" ", "_") / f"trial{r['trial']:03d}"
                if src.exists():
                    shutil.copytree(src, kept / c.replace(" ", "_") / src.name, symlinks=True)
            print(f"failed trials kept in {kept}")
    elapsed = time.perf_counter() - t0

    desc = machine("cpu")
    header = ["command", "kill", "trials", *COLUMNS]
    lines = [(f"Fault suite, {date.today().isoformat()}: {args.trials} trials per command, seed {args.seed}, "
              f"{elapsed / 60:.1f} min on {desc}."), "",
             markdown_table(header, summarise(results)), ""]
    for c, res in results.items():
        lines.append(f"- `{c}`: {len(res['points'])} named fault points, uninterrupted run "
                     f"{res['uninterrupted_s']:.1f} s (the delay range)")
    if failed:
        lines += ["", "Failures (reproduce with the seed, trial and kill):", ""]
        lines += [f"- `{c}` trial {r['trial']}: {r['error'].splitlines()[0][:300]}" for c, r in failed]
    markdown = "\n".join(lines)
    data = {"date": date.today().isoformat(), "machine": desc, "seed": args.seed, "trials_per_command": args.trials,
            "minutes": round(elapsed / 60, 2), "columns": COLUMNS, "results": results}

    from ctxsim.io import atomic_write_text

    dirs = [Path(args.out_dir)] if args.out_dir else [RESULTS] + ([Path(os.environ["OUT"])] if os.environ.get("OUT")
                                                                  else [])
    for d in dirs:
        atomic_write_text(d / "faults.md", markdown + "\n")
        atomic_write_text(d / "faults.json", json.dumps(data, indent=1) + "\n")
    print(markdown)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
