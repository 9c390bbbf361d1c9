"""One table of every evaluation mode on one artifact, so the size of each gain (and of each
leak) is visible side by side. CPU is fine for a small model; expect minutes.

    DATA_PATH=... TOKENIZER_PATH=... VOCAB_SIZE=1024 PRESET=sample \\
        python3 bench/eval_modes.py logs/RUN.ptz --max-tokens 60000
        python3 bench/eval_modes.py logs/RUN.ptz --mode TTT --mode "LoRA TTT" --mode "LoRA TTT + phases"

Environment knobs (EVAL_SEQ_LEN, EVAL_STRIDE, TTT_*, SLOT_* ...) set the common settings; each row
overrides only what names it, and takes a common setting only where one of its modes reads it (TTT_DOC_BATCH
reaches the LoRA rows, not the chunk TTT or SLOT ones).
"""
import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
import eval_artifact  # noqa: E402
import train_gpt as tg  # noqa: E402

CHUNK = dict(TTT_MODE="chunk")  # the 1.0810 record's TTT (the defaults are the LoRA TTT of the top row)
MODES = [
    ("sliding", dict(TTT_ENABLED="0", SLOT_ENABLED="0")),
    ("TTT", dict(TTT_ENABLED="1", SLOT_ENABLED="0", **CHUNK)),
    ("LoRA TTT, LR 0 (its windows, no adaptation)", dict(TTT_ENABLED="1", SLOT_ENABLED="0", TTT_MODE="lora",
                                                         TTT_LORA_LR="0", PHASED_TTT_PHASES="0")),
    ("LoRA TTT", dict(TTT_ENABLED="1", SLOT_ENABLED="0", TTT_MODE="lora", PHASED_TTT_PHASES="0")),
    ("LoRA TTT + 1 phase (the record's)", dict(TTT_ENABLED="1", SLOT_ENABLED="0", TTT_MODE="lora",
                                               PHASED_TTT_PHASES="1")),
    ("LoRA TTT + phases", dict(TTT_ENABLED="1", SLOT_ENABLED="0", TTT_MODE="lora", PHASED_TTT_PHASES="3")),
    ("TTT + split softcaps", dict(TTT_ENABLED="1", SLOT_ENABLED="0", ASYM_LOGIT_RESCALE="1", **CHUNK)),
    ("LoRA TTT + phases + split softcaps", dict(TTT_ENABLED="1", SLOT_ENABLED="0", TTT_MODE="lora",
                                                PHASED_TTT_PHASES="3", ASYM_LOGIT_RESCALE="1")),
    ("SLOT AdamW", dict(TTT_ENABLED="0", SLOT_ENABLED="1", SLOT_OPTIMIZER="adamw")),
    ("SLOT L-BFGS", dict(TTT_ENABLED="0", SLOT_ENABLED="1", SLOT_OPTIMIZER="lbfgs")),
    ("TTT + SLOT AdamW", dict(TTT_ENABLED="1", SLOT_ENABLED="1", SLOT_OPTIMIZER="adamw", **CHUNK)),
    ("SLOT AdamW, SLOT_MODE=full (non-compliant)", dict(TTT_ENABLED="0", SLOT_ENABLED="1", SLOT_MODE="full")),
    ("SLOT AdamW, SLOT_DELTA_SCOPE=batch (non-compliant)", dict(TTT_ENABLED="0", SLOT_ENABLED="1",
                                                                SLOT_DELTA_SCOPE="batch")),
    ("SLOT L-BFGS + logit bias, full (non-compliant, as #675)",
     dict(TTT_ENABLED="0", SLOT_ENABLED="1", SLOT_OPTIMIZER="lbfgs", SLOT_LOGIT_BIAS="1", SLOT_MODE="full")),
]


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
        summary = eval_artifact.evaluate_file(row_environment(os.environ, knobs), args.artifact, args.max_tokens,
                                              log=lambda _: None)
        rows.append((name, summary, time.perf_counter() - t0))
        print(f"{name}: {summary['val_bpb']:.4f} ({summary['score_source']})", flush=True)
    first = rows[0][1]
    print(f"\n{first['tokens']} validation tokens of {args.artifact}; plain (non-overlapping) val_bpb {first['quantized_val_bpb']:.4f}\n")
    print(f"| mode | val_bpb | vs {rows[0][0]} | compliant | seconds |\n|---|---|---|---|---|")
    for name, s, seconds in rows:
        print(f"| {name} | {s['val_bpb']:.4f} | {s['val_bpb'] - first['val_bpb']:+.4f} | "
              f"{'yes' if s['compliant'] else 'NO'} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
