"""Train the same configuration with and without some knobs, over a few seeds, and print one table.

    python3 bench/ablate.py --seeds 1 2 --variant smear:SMEAR_GATE=1 --variant sparse:SPARSE_ATTN_GATE=1 \
        --variant taper:WD_TAPER_FINAL_MULT=0.5 -- PRESET=sample TTT_ENABLED=0 SLOT_ENABLED=0

Every run is `train_gpt.py` in its own process with the shared knobs after `--`, the variant's knobs on top, and
SEED set, so the baseline and each variant see the same steps and data order. The table gives, per variant, the
mean over seeds of the pre-quantization, quantized and final val_bpb, the difference of each from the baseline
(negative is better), the spread over seeds, ms/step and the artifact's bytes. A CPU run on a small corpus is a
weak signal for an 8xH100 score: use it to catch a piece that hurts or breaks, not to size its gain.
`--json FILE` keeps every run's figures.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("pre_quant_val_bpb", "quantized_val_bpb", "val_bpb", "ms_per_step", "artifact_bytes_total")


def parse_knobs(pairs: list[str]) -> dict[str, str]:
    knobs = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: {pair!r} is not NAME=VALUE")
        knobs[name] = value
    return knobs


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'label:A=1,B=2' -> ('label', {'A': '1', 'B': '2'}); a comma starts a new knob only before NAME=, so a
    value may hold commas (TRAIN_SEQ_SCHEDULE=64:0.3,128:0.6)."""
    label, sep, knobs = text.partition(":")
    if not sep or not label:
        raise SystemExit(f"error: --variant {text!r} is not LABEL:NAME=VALUE[,NAME=VALUE...]")
    return label, parse_knobs(re.split(r",(?=[A-Z][A-Z0-9_]*=)", knobs))


def run_one(knobs: dict[str, str], log_dir: Path, run_id: str) -> dict:
    env = {**os.environ, **knobs, "LOG_DIR": str(log_dir), "RUN_ID": run_id}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train_gpt.py")], env=env, cwd=REPO_ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    summary_path = log_dir / f"{run_id}.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if done.returncode or summary.get("status") != "ok":
        raise SystemExit(f"error: run {run_id} failed ({summary.get('error') or done.stderr[-500:]}); "
                         f"see {log_dir / (run_id + '.txt')}")
    return {k: summary.get(k) for k in FIGURES}


def table(results: dict[str, list[dict]]) -> str:
    base = results["baseline"]

    def mean(runs, key):
        return statistics.fmean(r[key] for r in runs)

    rows = ["| variant | pre-quant bpb | Δ | quantized bpb | Δ | final bpb | Δ | spread (final) | ms/step | bytes |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in results.items():
        cells = []
        for key in FIGURES[:3]:
            value = mean(runs, key)
            cells += [f"{value:.5f}", "" if label == "baseline" else f"{value - mean(base, key):+.5f}"]
        spread = max(r["val_bpb"] for r in runs) - min(r["val_bpb"] for r in runs)
        rows.append(f"| {label} | {' | '.join(cells)} | {spread:.5f} | {mean(runs, 'ms_per_step'):.0f} | "
                    f"{mean(runs, 'artifact_bytes_total'):.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variant", action="append", default=[], type=parse_variant,
                        help="LABEL:NAME=VALUE[,NAME=VALUE...]; repeatable")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("shared", nargs="*", help="NAME=VALUE knobs every run gets (after --)")
    args = parser.parse_args(argv)
    shared = parse_knobs(args.shared)
    variants = [("baseline", {})] + args.variant
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, knobs in variants:
            for seed in args.seeds:
                run_id = f"{label}_s{seed}"
                results.setdefault(label, []).append(run_one({**shared, **knobs, "SEED": str(seed)}, Path(tmp), run_id))
                print(f"{run_id}: {results[label][-1]}", flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(dict(shared=shared, variants=dict(variants), seeds=args.seeds, runs=results),
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
