"""The short table that benchmarks/gpu_check.sh prints last: reads the JSON results of its steps from one folder.

    python benchmarks/gpu_summary.py RESULTS_DIR [--combine OUT_DIR]

With --combine, also writes OUT_DIR/gpu_check.md (every step's markdown, then this table) and
OUT_DIR/gpu_check.json (every step's data), so a device run brings back a few files only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(d: Path, stem: str) -> dict | None:
    p = d / f"{stem}_cuda.json"
    if not p.exists():
        p = d / f"{stem}_cpu.json"
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


def rows(d: Path) -> list[list[str]]:
    out: list[list[str]] = []
    status = {}
    sp = d / "steps.txt"
    if sp.exists():
        for line in sp.read_text().splitlines():
            name, _, rc = line.partition(" ")
            status[name] = rc
    out.append(["gpu tests (pytest -m gpu)", status.get("tests", "not run"), "rc 0"])
    ts = load(d, "train_speed")
    if ts:
        out.append([f"trainer / bare images/s ({ts['backbone']} {ts['size']} px b{ts['batch']}, default AMP)",
                    f"{ts['ratio']:.3f}", ">= 0.95"])
        by = {r["variant"]: r["images_per_s"] for r in ts["rows"]}
        if "Trainer.train_step (fp16)" in by and "Trainer.train_step (bf16)" in by:
            out.append(["trainer images/s bf16 / fp16",
                        f"{by['Trainer.train_step (bf16)']:.0f} / {by['Trainer.train_step (fp16)']:.0f}", ""])
    else:
        out.append(["trainer / bare images/s", status.get("train_speed", "not run"), ">= 0.95"])
    lc = load(d, "loss_cost")
    if lc:
        shares = ", ".join(f"{r['loss_batch']}: {100 * r['share']:.2f} %" for r in lc["rows"])
        out.append([f"hybrid loss / {lc['backbone']} step b{lc['batch']} {lc['size']} px", shares, "small"])
    else:
        out.append(["hybrid loss share of a step", status.get("loss_cost", "not run"), ""])
    gs = load(d, "gpu_search")
    if gs:
        for r in gs["rows"]:
            out.append([f"exact top-{gs['k']} {gs['n']:,}x{gs['dim']}, query batch {r['query_batch']}",
                        f"{r['searcher_qps']:,.0f} q/s (knn() {r['knn_qps']:,.0f})",
                        f"bound {r['bandwidth_bound_qps']:,.0f} q/s"])
    else:
        out.append(["exact search 1M x 512", status.get("search", "not run"), ""])
    gi = load(d, "gpu_inference")
    if gi:
        out.append([f"compiled / eager images/s at b{gi['batch']}",
                    f"{gi['speedup']:.2f}x ({gi['compiled_ips']:.0f} vs {gi['eager_ips']:.0f})", ">= 2x"])
        out.append(["batch-1 latency compiled / eager",
                    f"{gi['latency_ratio']:.2f} ({gi['compiled_latency_ms']:.2f} vs {gi['eager_latency_ms']:.2f} ms)",
                    "<= 0.33"])
        out.append(["parity: min cosine to fp32, compiled / eager bf16",
                    f"{gi['cos_min_compiled']:.4f} / {gi['cos_min_eager']:.4f}", ">= 0.99"])
    else:
        out.append(["inference eager vs compiled", status.get("inference", "not run"), ""])
    dt = load(d, "decode_throughput")
    if dt:
        by = {(r["stage"], r["path"]): r for r in dt["rows"]}
        for stage in ("eval", "train"):
            dev = by.get((stage, f"device, {dt['decoders'][0]}"))
            pil = by.get((stage, "Pillow, 1 core"))
            if dev and pil:
                out.append([f"JPEG -> {dt['crop']} px {stage} batch, device / Pillow (1 core)",
                            f"{dev['vs_pillow']:.1f}x ({dev['images_per_s']:,.0f} vs {pil['images_per_s']:,.0f} img/s)",
                            "> 1 core's worth"])
    else:
        out.append(["JPEG decode on the device", status.get("decode", "not run"), ""])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--combine", default=None)
    a = ap.parse_args()
    d = Path(a.results)
    table = ["| check | result | target |", "|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows(d)]
    text = "\n".join(table)
    if a.combine:
        out = Path(a.combine)
        out.mkdir(parents=True, exist_ok=True)
        parts = [p.read_text() for p in sorted(d.glob("*.md"))]
        (out / "gpu_check.md").write_text("\n\n".join(parts + ["**Summary**\n\n" + text]) + "\n")
        data = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
        (out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
