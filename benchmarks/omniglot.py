"""Omniglot benchmark: the contextual-similarity loss (hybrid, contextual only) against baselines, with ablations.

One command reruns everything and rewrites the section "Omniglot: contextual loss vs baselines" of
docs/BENCHMARKS.md (and the curve PNG in docs/):

    python benchmarks/omniglot.py                 # full protocol: 3 seeds, 5 full epochs (hours on a 2-core CPU)
    python benchmarks/omniglot.py --quick         # 1 seed, 2 short epochs (smoke-level evidence)
    python benchmarks/omniglot.py --quick --jobs 2 --parts main,ablations,noise
    python benchmarks/omniglot.py --report-only   # rewrite the docs from the cached results

Protocol: train on the 964 background characters minus the held-out validation alphabets (data.val_classes
= 0.2 of the 30 background alphabets, split by alphabet), pick each method's learning rate on the validation
alphabets from the same 3-value grid (seed 0, final-epoch val R@1), then report on the 659 evaluation characters
(13,180 images, each querying the rest): R@1, R@2, R@4, R@8, MAP@R. Same network, data, augmentation,
batch composition (m = 4), epochs and embedding size for every method.

Every run (setting, method, lr, seed) writes its metrics JSON under benchmarks/results/omniglot/<mode>/ and is
skipped when that file exists, so the benchmark resumes after an interruption.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import cpu_name  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "omniglot"
RESULTS = REPO / "benchmarks" / "results" / "omniglot"
DOC = REPO / "docs" / "BENCHMARKS.md"
SECTION = "## Omniglot: contextual loss vs baselines"

# ---- protocol ---------------------------------------------------------------------------------------------------
MODES = {
    # epochs, batches per epoch (None = all training images / batch size), seeds, lr-decay milestones
    "full": {"epochs": 5, "batches": None, "seeds": 3, "milestones": [4], "ablation_seeds": 1, "noise_seeds": 3,
             "lite0_epochs": 2, "lite0_batches": None, "lite0_seeds": 3},
    "quick": {"epochs": 2, "batches": 30, "seeds": 1, "milestones": [100], "ablation_seeds": 1, "noise_seeds": 1,
              "lite0_epochs": 1, "lite0_batches": 10, "lite0_seeds": 1},
}
LR_GRID = [3e-4, 1e-3, 3e-3]
LITE0_LR_GRID = [1e-4, 3e-4, 1e-3]
HYBRID = {"lam": 0.4, "gamma": 0.1, "reg_target": 0.25, "k": 4, "eps": 0.05, "pos_margin": 0.75, "neg_margin": 0.6}
METHODS = {  # label, loss name, loss params, proxy lr as a multiple of the network lr (proxy losses only)
    "hybrid": ("hybrid, paper settings (lam 0.4, margins 0.75/0.6)", "hybrid", dict(HYBRID), None),
    "hybrid-m0.9": ("hybrid, margins 0.9/0.6 (margin picked on val)", "hybrid", {**HYBRID, "pos_margin": 0.9}, None),
    "contextual": ("contextual only (lam 1)", "hybrid", {**HYBRID, "lam": 1.0}, None),
    "contrastive": ("margin contrastive (0.9/0.6)", "contrastive", {}, None),
    "triplet": ("triplet + distance-weighted miner", "triplet", {}, None),
    "multisimilarity": ("multi-similarity + miner", "multisimilarity-miner", {}, None),
    "proxy-anchor": ("proxy-anchor (proxies at 10x lr)", "proxy-anchor", {}, 10.0),
}
ABLATIONS = {  # name -> list of (value label, hybrid params)
    "lam": [(str(v), {"lam": v}) for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)],
    "eps": [(str(v), {"eps": v}) for v in (0.0, 0.05, 0.1)],
    "k": [(str(v), {"k": v}) for v in (2, 4, 8)],
    "gamma": [("0.1 (default)", {"gamma": 0.1}), ("0 (no regulariser)", {"gamma": 0.0})],
}
INVESTIGATE = [  # label, hybrid params, lr (None = hybrid's picked lr), warm-up epochs
    ("lam 0: contrastive with margins 0.75/0.6 + regulariser", {"lam": 0.0}, 3e-3, 0),
    ("margins 0.9/0.6 (the contrastive baseline's)", {"pos_margin": 0.9}, None, 0),
    ("margins 0.9/0.6", {"pos_margin": 0.9}, 3e-3, 0),
    ("no regulariser (gamma 0)", {"gamma": 0.0}, 3e-3, 0),
    ("official 256-px weighting (contrastive weight 1 - lam - gamma)", {"weighting": "official256"}, None, 0),
    ("heuristic-gradient alpha 3 (default 10)", {"alpha": 3.0}, None, 0),
    ("warm-up 1 epoch", {}, 3e-3, 1),
    ("lam 0.2", {"lam": 0.2}, 3e-3, 0),
]
NOISE_METHODS = ["hybrid", "hybrid-m0.9", "contrastive", "multisimilarity"]
NOISE_INVESTIGATE = [  # label, hybrid params, lr (None = hybrid's picked lr): paper settings under 20% noise, seed 0
    ("lam 0: the margin-0.75/0.6 contrastive term + regulariser alone", {"lam": 0.0}, None),
    ("lam 1: the contextual term + regulariser alone", {"lam": 1.0}, None),
    ("no regulariser (gamma 0)", {"gamma": 0.0}, None),
    ("lr 3e-4 (a third of the picked lr)", {}, 3e-4),
    ("positive margin 0.9, same lr", {"pos_margin": 0.9}, None),
]
TUNED_LAMS = [0.0, 0.2, 0.4, 0.6, 1.0]  # lam sweep again with the positive margin 0.9
LITE0_METHODS = ["hybrid", "hybrid-m0.9", "contrastive", "multisimilarity"]


def base_overrides(mode: str, data_root: Path) -> dict:
    m = MODES[mode]
    return {"data": {"dataset": "omniglot", "root": str(data_root), "val_classes": 0.2, "m": 4, "batch_size": 128,
                     "batches_per_epoch": m["batches"], "label_noise": 0.0},
            "optim": {"milestones": m["milestones"]}, "epochs": m["epochs"], "eval_every": 1, "device": "cpu"}


def lite0_overrides(mode: str, data_root: Path) -> dict:
    m = MODES[mode]
    o = base_overrides(mode, data_root)
    o["model"] = {"backbone": "efficientnet_lite0", "pretrained": "imagenet", "in_channels": 3, "pooling": "avg",
                  "standardize": True, "frozen_bn": True, "embedding_dim": 128}
    o["preprocess"] = {"input_size": 64, "resize_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": "RGB"}
    o["epochs"], o["data"]["batches_per_epoch"] = m["lite0_epochs"], m["lite0_batches"]
    o["optim"]["milestones"] = [100]
    return o


def run_key(setting: str, method: str, lr: float, seed: int) -> str:
    return f"{setting}/{method}/lr{lr:g}_seed{seed}"


def make_spec(mode, setting, method, lr, seed, data_root, params=None, noise=0.0, lite0=False, warmup=0):
    _label, loss, p, proxy_mult = METHODS[method]
    o = lite0_overrides(mode, data_root) if lite0 else base_overrides(mode, data_root)
    if setting != "main":  # only the main table's runs draw per-epoch curves; the rest evaluate once, at the end
        o["eval_every"] = o["epochs"]
    o["loss"] = {"name": loss, "params": {**p, **(params or {})}, "warmup_epochs": warmup}
    if proxy_mult:
        o["loss"]["lr"] = lr * proxy_mult
    o["optim"]["lr"] = lr
    o["data"]["label_noise"] = noise
    o["seed"] = seed
    return {"mode": mode, "setting": setting, "method": method, "lr": lr, "seed": seed, "overrides": o,
            "key": run_key(setting, method, lr, seed)}


def result_path(spec) -> Path:
    return RESULTS / spec["mode"] / f"{spec['key']}.json"


def load_result(spec) -> dict | None:
    p = result_path(spec)
    return json.loads(p.read_text()) if p.exists() else None


def _deep(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params" else v
    return out


def resolve_spec(spec: dict):
    """The omniglot recipe with the run's overrides; loss.params are *replaced* (not merged with the recipe's
    hybrid parameters, which a baseline loss would reject)."""
    from ctxsim.config import load_yaml, resolve_config

    base = load_yaml(REPO / "models" / "omniglot.yaml")
    base.setdefault("loss", {})["params"] = {}
    return resolve_config(overrides=_deep(base, spec["overrides"]))


def run_one(spec: dict, threads: int) -> dict:
    """Train one configuration in a scratch folder and write its metrics JSON (the cache entry)."""
    import torch

    torch.set_num_threads(threads)
    from ctxsim.io import atomic_write_json
    from ctxsim.train import train

    cfg = resolve_spec(spec)
    scratch = Path(tempfile.mkdtemp(prefix="ctxsim-omni-"))
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        try:
            res = train(cfg, scratch / "run")
            history, error = res.history, None
        except Exception as e:  # noqa: BLE001 - a diverged run is a result too
            history, error = [], f"{e.__class__.__name__}: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = {**{k: spec[k] for k in ("mode", "setting", "method", "lr", "seed", "key")},
           "config": cfg.to_dict(), "history": history, "error": error,
           "final": history[-1] if history else None, "seconds": time.perf_counter() - t0,
           "cpu_seconds": time.process_time() - c0, "threads": threads}
    atomic_write_json(result_path(spec), out)
    return out


def execute(specs: list[dict], jobs: int, log) -> None:
    todo = [s for s in specs if load_result(s) is None]
    for s in specs:
        if s not in todo:
            log(f"  cached   {s['key']}")
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    done = 0
    if jobs == 1:
        for s in todo:
            log(f"  running  {s['key']} ...")
            r = run_one(s, threads)
            done += 1
            log(f"  [{done}/{len(todo)}] {_line(r)}")
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, s, threads): s for s in todo}
        log(f"  running {len(todo)} runs on {jobs} workers ...")
        for f in as_completed(futures):
            done += 1
            log(f"  [{done}/{len(todo)}] {_line(f.result())}")


def _line(r: dict) -> str:
    if r["error"]:
        return f"{r['key']}: FAILED {r['error']} ({r['seconds']:.0f} s)"
    f = r["final"]
    return (f"{r['key']}: val R@1 {f.get('val/R@1', float('nan')):.4f}  test R@1 {f['test/R@1']:.4f}  "
            f"MAP@R {f['test/MAP@R']:.4f} ({r['seconds']:.0f} s)")


# ---- plan -------------------------------------------------------------------------------------------------------
def val_score(r: dict | None) -> float:
    if not r or r["error"] or not r["final"]:
        return -math.inf
    return r["final"].get("val/R@1", -math.inf)


def pick_lr(mode, setting, method, grid, data_root, **kw) -> float | None:
    """The grid value with the best final-epoch validation R@1 at seed 0 (None until all grid runs exist)."""
    rs = [(lr, load_result(make_spec(mode, setting, method, lr, 0, data_root, **kw))) for lr in grid]
    if any(r is None for _, r in rs):
        return None
    return max(rs, key=lambda t: val_score(t[1]))[0]


def plan(mode: str, part: str, data_root: Path, seeds: int, methods=None, lrs=None) -> list[dict]:
    """Runs of one part whose prerequisites (a chosen lr) are known; ``methods``/``lrs`` restrict the main grid
    (a slice: the report then says which grid values ran)."""
    m = MODES[mode]
    specs = []
    if part == "main":
        specs = [make_spec(mode, "main", me, lr, 0, data_root) for me in (methods or METHODS)
                 for lr in (lrs or LR_GRID)]
    elif part == "seeds":
        for me in (methods or METHODS):
            lr = pick_lr(mode, "main", me, LR_GRID, data_root)
            if lr is not None:
                specs += [make_spec(mode, "main", me, lr, s, data_root) for s in range(1, seeds)]
    elif part == "ablations":
        lr = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
        if lr is not None:
            for name, values in ABLATIONS.items():
                for label, params in values:
                    for s in range(m["ablation_seeds"]):
                        specs.append(ablation_spec(mode, name, label, params, lr, s, data_root))
    elif part == "warmup":
        lr = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
        if lr is not None:
            specs = [make_spec(mode, "warmup1", "hybrid", lr, s, data_root, warmup=1)
                     for s in range(m["ablation_seeds"])]
    elif part == "investigate":
        lr = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
        if lr is not None:
            specs = [investigate_spec(mode, params, lr_i or lr, w, data_root) for _, params, lr_i, w in INVESTIGATE]
    elif part == "tuned":
        lr = pick_lr(mode, "main", "hybrid-m0.9", LR_GRID, data_root)
        if lr is not None:  # every lam at seed 0, then all seeds for the two best on validation
            specs = [tuned_spec(mode, lam, lr, data_root) for lam in TUNED_LAMS]
            first = {lam: load_result(tuned_spec(mode, lam, lr, data_root)) for lam in TUNED_LAMS}
            if all(first.values()):
                best = sorted(TUNED_LAMS, key=lambda lam: val_score(first[lam]), reverse=True)[:2]
                specs += [tuned_spec(mode, lam, lr, data_root, s) for lam in best for s in range(1, seeds)]
    elif part == "noise":
        for s in range(m["noise_seeds"]):  # seed-major: an interrupted run still has every method at seed 0
            for me in NOISE_METHODS:
                lr = pick_lr(mode, "main", me, LR_GRID, data_root)
                if lr is not None:
                    specs.append(make_spec(mode, "noise0.2", me, lr, s, data_root, noise=0.2))
    elif part == "noise-investigate":
        lr = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
        if lr is not None:
            specs = [noise_investigate_spec(mode, params, lr_i or lr, data_root) for _, params, lr_i in NOISE_INVESTIGATE]
    elif part == "lite0":  # the lr grid at seed 0, then the other seeds at each method's picked lr
        specs = [make_spec(mode, "lite0", me, lr, 0, data_root, lite0=True)
                 for me in LITE0_METHODS for lr in LITE0_LR_GRID]
        for me in LITE0_METHODS:
            lr = pick_lr(mode, "lite0", me, LITE0_LR_GRID, data_root, lite0=True)
            if lr is not None:
                specs += [make_spec(mode, "lite0", me, lr, s, data_root, lite0=True)
                          for s in range(1, m["lite0_seeds"])]
    else:
        raise SystemExit(f"unknown part {part!r}")
    return specs


def tuned_spec(mode, lam, lr, data_root, seed=0) -> dict:
    if lam == 0.4:
        return make_spec(mode, "main", "hybrid-m0.9", lr, seed, data_root)
    return make_spec(mode, f"tuned/lam{lam:g}", "hybrid-m0.9", lr, seed, data_root, params={"lam": lam})


def investigate_spec(mode, params, lr, warmup, data_root, seed=0) -> dict:
    """An investigation run; a change that equals a main-table method (margins 0.9/0.6) shares its cache entry."""
    if not warmup and {**HYBRID, **params} == METHODS["hybrid-m0.9"][2]:
        return make_spec(mode, "main", "hybrid-m0.9", lr, seed, data_root)
    tag = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}-{v}" for k, v in params.items()) or "default"
    if warmup:
        tag += f"_warmup{warmup}"
    return make_spec(mode, f"investigate/{tag}", "hybrid", lr, seed, data_root, params=params, warmup=warmup)


def noise_investigate_spec(mode, params, lr, data_root, seed=0) -> dict:
    """The paper-settings hybrid under 20% label noise with one change (``params`` or another ``lr``)."""
    tag = "_".join(f"{k}{v:g}" for k, v in params.items()) or "default"
    return make_spec(mode, f"noise0.2-investigate/{tag}", "hybrid", lr, seed, data_root, params=params, noise=0.2)


def clean_counterpart(mode, noisy, data_root) -> dict:
    """The cached run with the same loss settings, lr and seed as ``noisy``, without label noise."""
    o = noisy["overrides"]
    params, lr, seed = o["loss"]["params"], noisy["lr"], noisy["seed"]
    for me, (_, _, p, _) in METHODS.items():
        if o["loss"]["name"] == METHODS[me][1] and params == {**p}:
            return make_spec(mode, "main", me, lr, seed, data_root)
    changed = {k: v for k, v in params.items() if HYBRID.get(k) != v}
    name = next(iter(changed))
    return ablation_spec(mode, name, "", changed, lr, seed, data_root)


def ablation_spec(mode, name, label, params, lr, seed, data_root) -> dict:
    """An ablation run; the default hybrid setting is the main table's run (shared cache entry)."""
    full = {**HYBRID, **params}
    if full == HYBRID:
        return make_spec(mode, "main", "hybrid", lr, seed, data_root)
    if name == "lam" and params["lam"] == 1.0:
        return make_spec(mode, "main", "contextual", lr, seed, data_root)
    tag = "_".join(f"{k}{v:g}" for k, v in params.items())
    spec = make_spec(mode, f"ablation/{tag}", "hybrid", lr, seed, data_root, params=params)
    return spec


# ---- report -----------------------------------------------------------------------------------------------------
METRICS = ["R@1", "R@2", "R@4", "R@8", "MAP@R"]


def agg(results: list[dict], split: str = "test") -> dict[str, tuple[float, float, int]]:
    ok = [r for r in results if r and not r["error"] and r["final"]]
    out = {}
    for k in METRICS:
        vals = [100 * r["final"][f"{split}/{k}"] for r in ok]
        if vals:
            out[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan"), len(vals))
    return out


def fmt(t: tuple[float, float, int] | None) -> str:
    if not t:
        return "–"
    mean, std, n = t
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def machine() -> str:
    import torch

    return (f"{cpu_name()}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, "
            f"torch {torch.__version__} (CPU)")


def plot(mode: str, data_root: Path, path: Path, seeds: int) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    any_line = False
    for me, (label, *_rest) in METHODS.items():
        lr = pick_lr(mode, "main", me, LR_GRID, data_root)
        if lr is None:
            continue
        runs = [load_result(make_spec(mode, "main", me, lr, s, data_root)) for s in range(seeds)]
        runs = [r for r in runs if r and not r["error"]]
        if not runs:
            continue
        n = min(len(r["history"]) for r in runs)
        epochs = [runs[0]["history"][i]["epoch"] for i in range(n)]
        per_epoch = [[100 * r["history"][i]["test/R@1"] for r in runs] for i in range(n)]
        ys = [statistics.mean(v) for v in per_epoch]
        line, = ax.plot(epochs, ys, marker="o", label=f"{label}, lr {lr:g}" + (
            f", mean ± std of {len(runs)} seeds" if len(runs) > 1 else ""))
        if len(runs) > 1:
            sd = [statistics.stdev(v) for v in per_epoch]
            ax.fill_between(epochs, [y - d for y, d in zip(ys, sd)], [y + d for y, d in zip(ys, sd)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        any_line = True
    if not any_line:
        plt.close(fig)
        return False
    ax.set_xlabel("epoch" + (f" ({MODES[mode]['batches']} batches of 128)" if MODES[mode]["batches"] else ""))
    ax.set_ylabel("test R@1 (%), 659 evaluation characters")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Omniglot, {'full protocol' if mode == 'full' else 'quick mode'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


COMMANDS = {  # what reproduces each mode's tables (the per-run cache lets them run in pieces with --parts)
    "full": "python benchmarks/omniglot.py --jobs 2",
    "quick": "python benchmarks/omniglot.py --quick --seeds 3 --jobs 2 "
             "--parts main,seeds,ablations,warmup,investigate,tuned,noise",
}
MAX_SEEDS = 10  # the report aggregates every cached seed up to this


def report(data_root: Path) -> str:
    """The whole docs section: protocol, hand-written findings, the full protocol's tables, then quick mode's."""
    L = [SECTION, "",
         "Protocol: train on Omniglot's background set minus 20% of its 30 alphabets (held out by alphabet for "
         "validation), report on the 659 evaluation characters (13,180 images, every image querying all others). "
         "Every method uses the `omniglot` recipe's network (4-block ConvNet, 28 px greyscale, max pooling + "
         "LayerNorm, 128-d embedding), augmentation (random resized crop, scale 0.8-1), batches of 128 with m = 4, "
         "Adam (weight decay 1e-4, backbone at half the head's lr) and the same number of epochs. Each method's lr "
         f"is the value of the grid {{{', '.join(f'{x:g}' for x in LR_GRID)}}} with the best final validation-"
         "alphabet R@1 (seed 0); the evaluation characters never influence a choice. Figures: % on the "
         "evaluation characters, mean ± std over seeds (a single value where one seed ran).", ""]
    notes = RESULTS / "notes.md"
    if notes.exists():  # hand-written findings, kept next to the cached results so the script reproduces the section
        L += [notes.read_text(encoding="utf-8").rstrip("\n"), ""]
    for mode in MODES:
        if (RESULTS / mode).exists():
            L += mode_report(mode, data_root)
    return "\n".join(L)


def mode_report(mode: str, data_root: Path) -> list[str]:
    m, seeds = MODES[mode], MAX_SEEDS
    n_seeds = max((len(cached_seeds(mode, me, data_root)) for me in METHODS), default=0)
    if mode == "full":
        L = [f"### Full protocol: {n_seeds} seeds, {m['epochs']} epochs over all ~15,500 training images "
             f"(lr x0.3 after epoch {m['milestones'][0]})", ""]
    else:
        L = [f"### Quick mode: {n_seeds} seeds, {m['epochs']} short epochs of {m['batches']} batches of 128 "
             f"({m['epochs'] * m['batches'] * 128:,} training images seen in all, no lr decay)", "",
             "Early-training evidence that runs in minutes (the lr grid alone: 7.5 min); the same tables as above.", ""]
    # main table
    L += ["| method | lr (picked on val) | val R@1 per lr (" + " / ".join(f"{x:g}" for x in LR_GRID) + ") | seeds | "
          + " | ".join(METRICS) + " |", "|---|---|---|---|" + "---|" * len(METRICS)]
    best = {}
    for me, (label, *_r) in METHODS.items():
        vals = [load_result(make_spec(mode, "main", me, lr, 0, data_root)) for lr in LR_GRID]
        grid = " / ".join(f"{100 * val_score(r):.1f}" if val_score(r) > -math.inf else
                          ("diverged" if r else "–") for r in vals)
        lr = pick_lr(mode, "main", me, LR_GRID, data_root)
        runs = [load_result(make_spec(mode, "main", me, lr, s, data_root)) for s in range(seeds)] if lr else []
        a = agg(runs)
        best[me] = a
        n = a.get("R@1", (0, 0, 0))[2]
        L.append(f"| {label} | {'–' if lr is None else f'{lr:g}'} | {grid} | {n} | "
                 + " | ".join(fmt(a.get(k)) for k in METRICS) + " |")
    L.append("")
    L += compare(mode, data_root, seeds)
    png = REPO / "docs" / f"omniglot_{mode}_r1.png"
    if plot(mode, data_root, png, seeds):
        L += [f"![test R@1 per epoch, every method at its picked lr](omniglot_{mode}_r1.png)", ""]
    # ablations
    lr = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
    if lr is not None:
        L += [f"#### Ablations of the hybrid loss (lr {lr:g}, {m['ablation_seeds']} seed; other settings at the "
              "defaults lam 0.4, eps 0.05, k 4, gamma 0.1, margins 0.75/0.6, paper weighting)", ""]
        for name, values in ABLATIONS.items():
            rows = []
            for label, params in values:
                rs = [load_result(ablation_spec(mode, name, label, params, lr, s, data_root))
                      for s in range(m["ablation_seeds"])]
                if any(r is not None for r in rs):
                    v, t = agg(rs, "val"), agg(rs)
                    rows.append(f"| {name} = {label} | {fmt(v.get('R@1'))} | {fmt(t.get('R@1'))} | "
                                f"{fmt(t.get('MAP@R'))} |")
            if rows:
                L += [f"| {name} | val R@1 | test R@1 | test MAP@R |", "|---|---|---|---|", *rows, ""]
        wu = [load_result(make_spec(mode, "warmup1", "hybrid", lr, s, data_root, warmup=1))
              for s in range(m["ablation_seeds"])]
        if any(wu):
            h0 = load_result(make_spec(mode, "main", "hybrid", lr, 0, data_root))
            v, t = agg(wu, "val"), agg(wu)
            L += ["| warm-up | val R@1 | test R@1 | test MAP@R |", "|---|---|---|---|",
                  f"| none (default) | {fmt(agg([h0], 'val').get('R@1'))} | {fmt(agg([h0]).get('R@1'))} | "
                  f"{fmt(agg([h0]).get('MAP@R'))} |",
                  f"| loss.warmup_epochs 1 | {fmt(v.get('R@1'))} | {fmt(t.get('R@1'))} | {fmt(t.get('MAP@R'))} |", ""]
    # investigation
    lr = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
    rows = []
    if lr is not None:
        for label, params, lr_i, w in INVESTIGATE:
            r = load_result(investigate_spec(mode, params, lr_i or lr, w, data_root))
            if r:
                v, t = agg([r], "val"), agg([r])
                rows.append(f"| {label} | {(lr_i or lr):g} | {fmt(v.get('R@1'))} | {fmt(t.get('R@1'))} | "
                            f"{fmt(t.get('MAP@R'))} |")
    if rows:
        h = load_result(make_spec(mode, "main", "hybrid", lr, 0, data_root))
        c_lr = pick_lr(mode, "main", "contrastive", LR_GRID, data_root)
        c = load_result(make_spec(mode, "main", "contrastive", c_lr, 0, data_root)) if c_lr else None
        ref = [f"| hybrid defaults (main table, seed 0) | {lr:g} | {fmt(agg([h], 'val').get('R@1'))} | "
               f"{fmt(agg([h]).get('R@1'))} | {fmt(agg([h]).get('MAP@R'))} |"]
        if c:
            ref.append(f"| margin contrastive (main table, seed 0) | {c_lr:g} | {fmt(agg([c], 'val').get('R@1'))} | "
                       f"{fmt(agg([c]).get('R@1'))} | {fmt(agg([c]).get('MAP@R'))} |")
        L += ["#### Where the hybrid trails: single changes to the hybrid loss (seed 0)", "",
              "| change | lr | val R@1 | test R@1 | test MAP@R |", "|---|---|---|---|---|", *ref, *rows, ""]
    # tuned lam sweep
    lr_t = pick_lr(mode, "main", "hybrid-m0.9", LR_GRID, data_root)
    rows = []
    if lr_t is not None:
        for lam in TUNED_LAMS:
            rs = [load_result(tuned_spec(mode, lam, lr_t, data_root, s)) for s in range(MAX_SEEDS)]
            if rs[0]:
                v, t = agg(rs, "val"), agg(rs)
                rows.append(f"| lam = {lam:g} | {t['R@1'][2]} | {fmt(v.get('R@1'))} | {fmt(t.get('R@1'))} | "
                            f"{fmt(t.get('MAP@R'))} |")
    if rows:
        L += [f"#### lam sweep with the positive margin 0.9 (lr {lr_t:g}; every lam at seed 0, the two best on "
              "validation at every seed; lam 0 = margin contrastive 0.9/0.6 + regulariser)", "",
              "| lam | seeds | val R@1 | test R@1 | test MAP@R |", "|---|---|---|---|---|", *rows, ""]
    # noise
    rows = []
    for me in NOISE_METHODS:
        lr_m = pick_lr(mode, "main", me, LR_GRID, data_root)
        if lr_m is None:
            continue
        rs = [load_result(make_spec(mode, "noise0.2", me, lr_m, s, data_root, noise=0.2))
              for s in range(m["noise_seeds"])]
        if any(rs):
            t = agg(rs)
            clean = best[me].get("R@1")
            drop = f"{t['R@1'][0] - clean[0]:+.1f}" if clean and t.get("R@1") else "–"
            rows.append(f"| {METHODS[me][0]} | {lr_m:g} | {fmt(clean)} | {fmt(t.get('R@1'))} | {drop} | "
                        f"{fmt(t.get('MAP@R'))} |")
    if rows:
        L += ["#### Label noise (data.label_noise 0.2: 20% of training labels replaced at random; lr as picked on "
              "clean data; mean ± std where more than one seed ran)", "",
              "| method | lr | clean test R@1 (main table) | noisy test R@1 | change | noisy MAP@R |", "|---|---|---|---|---|---|",
              *rows, ""]
    lr_h = pick_lr(mode, "main", "hybrid", LR_GRID, data_root)
    rows = []
    if lr_h is not None:
        cases = [("paper settings (as in the table above)", make_spec(mode, "noise0.2", "hybrid", lr_h, 0, data_root,
                                                                      noise=0.2), lr_h)]
        cases += [(label, noise_investigate_spec(mode, params, lr_i or lr_h, data_root), lr_i or lr_h)
                  for label, params, lr_i in NOISE_INVESTIGATE]
        lr_9 = pick_lr(mode, "main", "hybrid-m0.9", LR_GRID, data_root)
        if lr_9 is not None:
            cases.append(("positive margin 0.9 at its own lr (hybrid-m0.9, as in the table above)",
                          make_spec(mode, "noise0.2", "hybrid-m0.9", lr_9, 0, data_root, noise=0.2), lr_9))
        for label, spec, lr_c in cases:
            r, c = load_result(spec), load_result(clean_counterpart(mode, spec, data_root))
            if r and not r["error"] and r["final"]:
                f = r["final"]
                clean = f"{100 * c['final']['test/R@1']:.1f}" if c and c["final"] else "–"
                drop = f"{100 * (f['test/R@1'] - c['final']['test/R@1']):+.1f}" if c and c["final"] else "–"
                rows.append(f"| {label} | {lr_c:g} | {clean} | {100 * f['test/R@1']:.1f} | {drop} | "
                            f"{100 * f['test/MAP@R']:.1f} |")
    if len(rows) > 2:
        L += ["#### Label noise: which part of the paper-settings hybrid collapses (20% noise, seed 0, one change "
              "at a time; clean = the same settings without noise, from the tables above)", "",
              "| variant | lr | clean test R@1 | noisy test R@1 | change | noisy MAP@R |", "|---|---|---|---|---|---|",
              *rows, ""]
    # lite0
    rows = []
    for me in LITE0_METHODS:
        rs = {lr: load_result(make_spec(mode, "lite0", me, lr, 0, data_root, lite0=True)) for lr in LITE0_LR_GRID}
        if any(rs.values()):
            done = {k: r for k, r in rs.items() if r}
            lr_b = max(done, key=lambda k: val_score(done[k]))
            runs = [load_result(make_spec(mode, "lite0", me, lr_b, s, data_root, lite0=True))
                    for s in range(MAX_SEEDS)]
            t = agg(runs)
            grid = " / ".join(f"{100 * val_score(rs[lr]):.1f}" if rs[lr] else "–" for lr in LITE0_LR_GRID)
            rows.append(f"| {METHODS[me][0]} | {lr_b:g} | {grid} | {t['R@1'][2]} | "
                        + " | ".join(fmt(t.get(k)) for k in METRICS) + " |")
    lite0_head = ["#### Regime (b): fine-tuning ImageNet EfficientNet-Lite0", "",
                  "EfficientNet-Lite0 (offline ImageNet weights), RGB 64 px, mean/std 0.5, avg pooling + LayerNorm, "
                  f"frozen BN, {m['lite0_epochs']} epoch(s)"
                  + (f" of {m['lite0_batches']} batches" if m["lite0_batches"] else "") + ", lr grid "
                  f"{{{', '.join(f'{x:g}' for x in LITE0_LR_GRID)}}} picked on val (seed 0), then {m['lite0_seeds']} "
                  "seed(s) at the picked lr.", ""]
    if rows:
        L += lite0_head + ["| method | lr (picked on val) | val R@1 per lr (" + " / ".join(f"{x:g}" for x in LITE0_LR_GRID)
                           + ") | seeds | " + " | ".join(METRICS) + " |", "|---|---|---|---|" + "---|" * len(METRICS),
                           *rows, ""]
    elif mode == "full":
        L += lite0_head + ["Not run on this machine yet: `python benchmarks/omniglot.py --parts lite0` runs it.", ""]
    runs = [json.loads(p.read_text()) for p in (RESULTS / mode).rglob("*.json")]
    done, secs = len(runs), sum(r["seconds"] for r in runs)
    L += [f"Command: `{COMMANDS[mode]}`. Machine: {machine()}, shared with other jobs while it ran. "
          f"{done} cached runs, {secs / 3600:.1f} h of run time summed over runs (about {secs / 7200:.1f} h elapsed, two "
          "runs at a time). Per-run JSON (config, "
          f"per-epoch metrics): `benchmarks/results/omniglot/{mode}/`.", ""]
    return L


def cached_seeds(mode: str, method: str, data_root: Path) -> list[int]:
    lr = pick_lr(mode, "main", method, LR_GRID, data_root)
    if lr is None:
        return []
    return [s for s in range(MAX_SEEDS) if load_result(make_spec(mode, "main", method, lr, s, data_root))]


def compare(mode: str, data_root: Path, seeds: int) -> list[str]:
    """Hybrid minus contrastive, per seed (same seed = same class split, sampler and initialisation)."""
    out = []
    for mine, other in (("hybrid", "contrastive"), ("hybrid", "contextual"), ("hybrid-m0.9", "contrastive"),
                        ("hybrid-m0.9", "multisimilarity")):
        lr_h = pick_lr(mode, "main", mine, LR_GRID, data_root)
        lr_o = pick_lr(mode, "main", other, LR_GRID, data_root)
        if lr_h is None or lr_o is None:
            continue
        diffs = {k: [] for k in ("R@1", "MAP@R")}
        for s in range(seeds):
            a = load_result(make_spec(mode, "main", mine, lr_h, s, data_root))
            b = load_result(make_spec(mode, "main", other, lr_o, s, data_root))
            if a and b and not a["error"] and not b["error"]:
                for k in diffs:
                    diffs[k].append(100 * (a["final"][f"test/{k}"] - b["final"][f"test/{k}"]))
        if diffs["R@1"]:
            n = len(diffs["R@1"])
            parts = []
            for k, v in diffs.items():
                sd = f" ± {statistics.stdev(v):.1f}" if n > 1 else ""
                wins = sum(d > 0 for d in v)
                parts.append(f"{k} {statistics.mean(v):+.1f}{sd} points (ahead in {wins} of {n} seeds)")
            out.append(f"{METHODS[mine][0]} minus {METHODS[other][0]}, test, paired by seed: " + "; ".join(parts) + ".")
    return ["\n".join(f"- {x}" for x in out), ""] if out else []


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section in docs/BENCHMARKS.md, leaving other sections alone."""
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    lines = old.splitlines()
    try:
        start = lines.index(SECTION)
    except ValueError:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines)
                                                                            else [])) + "\n"
    from ctxsim.io import atomic_write_text

    atomic_write_text(DOC, new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 short epochs")
    ap.add_argument("--data", type=Path, default=DATA, help="folder with the official Omniglot zips")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores // jobs threads)")
    ap.add_argument("--seeds", type=int, default=None, help="override the mode's number of seeds")
    ap.add_argument("--parts", default=None,
                    help="comma-separated, run in this order: main (lr grid), seeds, ablations, warmup, investigate, tuned, noise, "
                         "noise-investigate, lite0 "
                         "(default: all of them; with --quick: main)")
    ap.add_argument("--methods", default=None, help="main and seeds parts: a comma-separated subset of "
                    + ",".join(METHODS))
    ap.add_argument("--lrs", default=None, help="main part only: a comma-separated subset of the lr grid")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the docs from cached results")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    seeds = args.seeds or MODES[mode]["seeds"]

    def log(msg: str) -> None:
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    if not args.report_only:
        parts = args.parts or ("main" if args.quick else
                               "main,seeds,ablations,warmup,investigate,tuned,noise,noise-investigate,lite0")
        for part in parts.split(","):
            specs = plan(mode, part.strip(), args.data, seeds,
                         methods=args.methods.split(",") if args.methods else None,
                         lrs=[float(x) for x in args.lrs.split(",")] if args.lrs else None)
            log(f"part {part}: {len(specs)} runs")
            execute(specs, args.jobs, log)
            write_section(report(args.data))  # partial results land as they come
    write_section(report(args.data))
    log(f"wrote {DOC.relative_to(REPO)} and its plots in docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
