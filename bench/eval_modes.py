"""One table of every evaluation mode on one artifact, so the size of each gain (and of each
leak) is visible side by side. CPU is fine for a small model; expect minutes.

    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=1024 PRESET=sample \\
        python3 bench/eval_modes.py logs/RUN.ptz --max-tokens 60000
        python3 bench/eval_modes.py logs/RUN.ptz --mode TTT --mode "LoRA TTT" --mode "LoRA TTT + phases"

Environment knobs (EVAL_SEQ_LEN, EVAL_STRIDE, TTT_*, SLOT_* ...) set the common settings; each row
overrides only what names it, and takes a common setting only where one of its modes reads it (TTT_DOC_BATCH
reaches the LoRA rows, not the chunk TTT or SLOT ones). The rows marked "planted leak" run with one of
tools/check_causality.py's planted leaks (the trainer has no such mode), to show what a leak is worth.
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import check_causality  # noqa: E402
import eval_artifact  # noqa: E402
import train_gpt as tg  # noqa: E402

CHUNK = dict(TTT_MODE="chunk")  # the 1.0810 record's TTT (the defaults are the LoRA TTT of the top row)
LORA = dict(TTT_ENABLED="1", SLOT_ENABLED="0", TTT_MODE="lora")
TILT = dict(NGRAM_TILT="1")  # every row without it scores without the n-gram tilt
MODES = [(name, {"NGRAM_TILT": "0", **knobs}) for name, knobs in [
    ("sliding", dict(TTT_ENABLED="0", SLOT_ENABLED="0")),
    ("sliding + n-gram tilt", dict(TTT_ENABLED="0", SLOT_ENABLED="0", **TILT)),
    ("TTT", dict(TTT_ENABLED="1", SLOT_ENABLED="0", **CHUNK)),
    ("LoRA TTT, LR 0 (its windows, no adaptation)", dict(**LORA, TTT_LORA_LR="0", PHASED_TTT_PHASES="0")),
    ("LoRA TTT", dict(**LORA, PHASED_TTT_PHASES="0")),
    ("LoRA TTT + 1 phase", dict(**LORA, PHASED_TTT_PHASES="1")),
    ("LoRA TTT + 1 phase + n-gram tilt (the record's)", dict(**LORA, PHASED_TTT_PHASES="1", **TILT)),
    ("LoRA TTT + 2 phases + n-gram tilt (what the tilt's freed seconds buy)",
     dict(**LORA, PHASED_TTT_PHASES="2", **TILT)),
    ("LoRA TTT + phases", dict(**LORA, PHASED_TTT_PHASES="3")),
    ("TTT + split softcaps", dict(TTT_ENABLED="1", SLOT_ENABLED="0", ASYM_LOGIT_RESCALE="1", **CHUNK)),
    ("LoRA TTT + phases + split softcaps", dict(**LORA, PHASED_TTT_PHASES="3", ASYM_LOGIT_RESCALE="1")),
    ("SLOT", dict(TTT_ENABLED="0", SLOT_ENABLED="1")),
    ("TTT + SLOT", dict(TTT_ENABLED="1", SLOT_ENABLED="1", **CHUNK)),
    ("SLOT fitted on its scored positions too (planted leak)", dict(TTT_ENABLED="0", SLOT_ENABLED="1")),
    ("SLOT with one delta per batch (planted leak)", dict(TTT_ENABLED="0", SLOT_ENABLED="1")),
]]
PLANTED = {"SLOT fitted on its scored positions too (planted leak)": "slot-full",
           "SLOT with one delta per batch (planted leak)": "slot-batch"}


def row_environment(env, knobs: dict) -> dict:
    """The environment with a row's knobs, less the common settings that none of the row's modes read."""
    row = {**env, **knobs}
    cfg, changed = tg.resolve_config(row)
    idle = {name for names, _ in tg.idle_knobs(cfg, changed) for name in names} - set(knobs)
    return {k: v for k, v in row.items() if k not in idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--mode", action="append", dest="modes",
                        help="a mode to run, by name; repeat it for more (the first is the baseline); default: all")
    args = parser.parse_args()
    known = dict(MODES)
    wanted = args.modes or list(known)
    unknown = [m for m in wanted if m not in known]
    if unknown:
        parser.error(f"unknown mode {unknown[0]!r}; modes: {', '.join(known)}")
    rows = []
    for name, knobs in ((m, known[m]) for m in wanted):
        t0 = time.perf_counter()
        with check_causality.planted(PLANTED[name]) if name in PLANTED else contextlib.nullcontext():
            summary = eval_artifact.evaluate_file(row_environment(os.environ, knobs), args.artifact, args.max_tokens,
                                                  log=lambda _: None)
        rows.append((name, summary, time.perf_counter() - t0))
        print(f"{name}: {summary['val_bpb']:.4f} ({summary['score_source']})", flush=True)
    first = rows[0][1]
    print(f"\n{first['tokens']} validation tokens of {args.artifact}; plain (non-overlapping) val_bpb {first['quantized_val_bpb']:.4f}\n")
    print(f"| mode | val_bpb | vs {rows[0][0]} | n-gram hints (share) | seconds |\n|---|---|---|---|---|")
    for name, s, seconds in rows:
        hints = f"{s['ngram_hints']} ({100 * s['ngram_gated_share']:.2f} %)" if "ngram_hints" in s else "off"
        print(f"| {name} | {s['val_bpb']:.4f} | {s['val_bpb'] - first['val_bpb']:+.4f} | {hints} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
