"""Run the trainer once per seed, resumably, and print one table row per finished seed.

    SEEDS="42 1337 2025" python3 tools/sweep.py --name mytry                 # 8 GPUs: --nproc 8
    SEEDS="42 1337 2025" MATRIX_LR=0.025 python3 tools/sweep.py --name lr025 --nproc 8

Every knob in the environment passes through to each run; SEED, RUN_ID (<name>_s<seed>) and
LOG_DIR are set per seed. A seed whose summary (LOG_DIR/<name>_s<seed>.json) says status ok, beside
the log of that same run, is skipped, so an interrupted sweep resumes with the unfinished seed; a seed
whose RUN_ID a live process still holds (LOG_DIR/<name>_s<seed>.lock) is waited for, then skipped if that
run finished well. Ending the sweep (SIGTERM, Ctrl-C) ends its trainer too, which records that it was
killed; on Linux so does killing it outright (kill -9): the trainer gets SIGTERM when the sweep dies.
--nproc 1 runs `python train_gpt.py`, more runs it under torchrun. A failed seed's row gives the trainer's
error line. Exits 1 if any seed failed.
"""
import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
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
        wait_for_holder(path.with_suffix(".lock"), seed, out)
        summary = finished(path)
        if summary is not None:
            out(row(seed, summary, "skipped (complete)"))
            results.append(summary)
            continue
        run_env = {**env, "SEED": str(seed), "RUN_ID": f"{name}_s{seed}", "LOG_DIR": str(log_dir)}
        console_path = log_dir / f"{name}_s{seed}.stdout"
        with open(console_path, "w") as console:
            code = run_trainer(command(script, nproc), run_env, console)
        summary = finished(path)
        status = "ok" if summary else f"FAILED (exit {code}: {failure_line(console_path)}; see {path.with_suffix('.txt')})"
        stopped = stopped_after(path)
        if stopped:  # STOP_AFTER ended it early on purpose: no score, but no failure either
            status = f"stopped after {stopped}"
        out(row(seed, summary, status))
        results.append(summary)
    return results


def stopped_after(path: Path) -> str | None:
    """The stage STOP_AFTER ended this seed's run after, if it did."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary.get("stopped_after") if summary.get("status") == "stopped" else None


LOCK_POLL_SECONDS = 2.0


def wait_for_holder(lock: Path, seed: int, out) -> None:
    """A seed whose RUN_ID a live process holds (a run started by hand, or the trainer of a sweep that died before
    the trainer could hear of it) is waited for: starting it again would fail on the lock, and on GPUs two runs
    would share the devices and corrupt both runs' timings."""
    holder = train_gpt.lock_holder(lock)
    if holder is None or not train_gpt.process_alive(holder):
        return
    out(f"seed {seed}: its RUN_ID is held by running process {holder} ({lock}); waiting for that run to end")
    while holder is not None and train_gpt.process_alive(holder):
        time.sleep(LOCK_POLL_SECONDS)
        holder = train_gpt.lock_holder(lock)


def failure_line(console: Path) -> str:
    """Why a seed failed, from its console: the trainer's last error line, else its last line."""
    try:
        lines = [line.strip() for line in console.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def die_with(sweep_pid: int):
    """What the trainer's process runs before it starts (Linux): ask for SIGTERM when the sweep dies, however it dies,
    so a trainer never outlives its sweep (torchrun passes the signal on to its ranks)."""
    def arm() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return  # no prctl: killing the sweep outright leaves the trainer running
        if os.getppid() != sweep_pid:  # the sweep died before the request was made
            os._exit(128 + signal.SIGTERM)
    return arm


def run_trainer(cmd: list[str], env: dict, console) -> int:
    """Run one seed; if the sweep is told to stop, stop the trainer first (it records the signal)."""
    trainer = subprocess.Popen(cmd, env=env, stdout=console, stderr=subprocess.STDOUT,
                               preexec_fn=die_with(os.getpid()) if sys.platform.startswith("linux") else None)
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
