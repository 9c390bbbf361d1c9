"""Run the trainer once per seed, resumably, and print one table row per finished seed.

    SEEDS="42 1337 2025" python3 tools/sweep.py --name mytry                 # 8 GPUs: --nproc 8
    SEEDS="42 1337 2025" MATRIX_LR=0.025 python3 tools/sweep.py --name lr025 --nproc 8

Every knob in the environment passes through to each run; SEED, RUN_ID (<name>_s<seed>) and
LOG_DIR are set per seed. A seed whose summary (LOG_DIR/<name>_s<seed>.json) says status ok, beside
the log of that same run, is skipped, so an interrupted sweep resumes with the unfinished seed. Ending
the sweep (SIGTERM, Ctrl-C) ends its trainer too, which records that it was killed. --nproc 1 runs
`python train_gpt.py`, more runs it under torchrun. Exits 1 if any seed failed.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import train_gpt  # noqa: E402  (importing it has no side effects)

COLUMNS = ("seed", "status", "steps", "ms/step", "pre-quant", "quantized", "sliding", "ttt", "slot", "val_bpb",
           "source", "bytes", "train_s", "eval_s")


def summary_path(log_dir: Path, name: str, seed: int) -> Path:
    return log_dir / f"{name}_s{seed}.json"


def finished(path: Path) -> dict | None:
    """The summary of a run that ended well, beside its own log; None for anything else."""
    try:
        summary = json.loads(path.read_text())
        log = path.with_suffix(".txt").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") == "ok" and train_gpt.log_belongs_to(summary, log) else None


def row(seed: int, summary: dict | None, status: str) -> str:
    s = summary or {}

    def num(key, fmt):
        return format(s[key], fmt) if isinstance(s.get(key), (int, float)) else "-"
    cells = [str(seed), status, num("steps", "d"), num("ms_per_step", ".1f"), num("pre_quant_val_bpb", ".5f"),
             num("quantized_val_bpb", ".5f"), num("sliding_val_bpb", ".5f"), num("ttt_val_bpb", ".5f"),
             num("slot_val_bpb", ".5f"), num("val_bpb", ".5f"), s.get("score_source", "-"),
             num("artifact_bytes_total", "d"), num("train_seconds", ".1f"), num("eval_seconds", ".1f")]
    return " | ".join(cells)


def command(script: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]


def run_sweep(seeds: list[int], name: str, log_dir: Path, script: Path, nproc: int, env=None,
              out=print) -> list[dict | None]:
    """Run (or skip) every seed; returns the summaries (None for a failed seed)."""
    env = dict(os.environ if env is None else env)
    log_dir.mkdir(parents=True, exist_ok=True)
    out(" | ".join(COLUMNS))
    results = []
    for seed in seeds:
        path = summary_path(log_dir, name, seed)
        summary = finished(path)
        if summary is not None:
            out(row(seed, summary, "skipped (complete)"))
            results.append(summary)
            continue
        run_env = {**env, "SEED": str(seed), "RUN_ID": f"{name}_s{seed}", "LOG_DIR": str(log_dir)}
        with open(log_dir / f"{name}_s{seed}.stdout", "w") as console:
            code = run_trainer(command(script, nproc), run_env, console)
        summary = finished(path)
        out(row(seed, summary, "ok" if summary else f"FAILED (exit {code}; see {path.with_suffix('.txt')})"))
        results.append(summary)
    return results


def run_trainer(cmd: list[str], env: dict, console) -> int:
    """Run one seed; if the sweep is told to stop, stop the trainer first (it records the signal)."""
    trainer = subprocess.Popen(cmd, env=env, stdout=console, stderr=subprocess.STDOUT)
    stopped = []

    def stop(signum, _frame):  # no wait() here: the interrupted wait() below holds Popen's lock
        stopped.append(signum)
        trainer.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = trainer.wait()  # resumes after the handler, until the trainer has recorded its end
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        raise SystemExit(128 + stopped[0])
    return code


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"error: SEEDS={text!r} must be integers separated by spaces") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: SEEDS={text!r} must name at least one seed, each once")
    return seeds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=os.environ.get("SEEDS", ""), help="default: $SEEDS")
    parser.add_argument("--name", required=True, help="sweep name; runs are <name>_s<seed>")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run")
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("LOG_DIR", "logs")))
    parser.add_argument("--script", type=Path, default=REPO_ROOT / "train_gpt.py", help="the trainer (raw or packed)")
    args = parser.parse_args(argv)
    if not args.script.is_file():
        raise SystemExit(f"error: --script {args.script} not found")
    results = run_sweep(parse_seeds(args.seeds), args.name, args.log_dir, args.script, args.nproc)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
