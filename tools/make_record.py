"""Write a record folder from a sweep's summaries and logs, or refuse and say why.

    python3 tools/make_record.py --name MyTry --author "A. Person" --github-id aperson \\
        --reference path/to/2026-05-01_SP8192_PR2130Base_Calib32 logs/mytry_s42.json logs/mytry_s1337.json \\
        logs/mytry_s2025.json

Writes records/track_<track>/<date>_<name>/ with train_gpt.py (the exact script text the runs
logged: the packed wrapper if they ran it, else the raw source), README.md with a per-seed table,
submission.json, requirements.txt and one log per seed. Refuses, naming the seed and the reason,
if any seed did not finish, is over 16,000,000 bytes counting the shipped script's real size,
read training data (steps plus GPTQ calibration) for over 600 s, evaluated over 600 s, ran a non-compliant mode on
the record track, trained on data that tools/check_overlap.py found to hold validation text, or if the seeds'
configurations (besides SEED and RUN_ID) or scripts differ. Warns (and the README says) when a seed's data was
never checked for overlap, or its check no longer matches the shards.
"""
import argparse
import datetime
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tools"))
sys.path.insert(0, str(REPO_ROOT))
import significance  # noqa: E402
import train_gpt  # noqa: E402  (its time rule; importing it has no side effects)

LIMIT_BYTES, LIMIT_SECONDS = 16_000_000, 600.0
SEPARATOR = "\n" + "=" * 100 + "\n"  # the trainer's log: its script text, this line, then the run
TRACKS = {"10min_16mb": True, "non_record_16mb": False}  # track -> is a record track
PER_SEED_KEYS = ("SEED", "RUN_ID", "LOG_DIR")
# What a finished run's summary must hold for the checks and the record; the numbers must be finite.
REQUIRED_NUMBERS = ("seed", "model_bytes", "train_seconds", "steps", "ms_per_step", "val_loss", "val_bpb")


class Refused(Exception):
    pass


def read_summary(summary_path: Path) -> dict:
    try:
        run = json.loads(summary_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Refused(f"{summary_path}: no such run summary") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Refused(f"{summary_path}: not a readable run summary ({e})") from None
    if not isinstance(run, dict):
        raise Refused(f"{summary_path}: not a run summary (a JSON object)")
    return run


def check_finished_fields(run: dict, summary_path: Path) -> None:
    """A finished run's summary holds every field the record uses; an unfinished one is refused later, by check()."""
    if run.get("status") != "ok":
        return
    for key in REQUIRED_NUMBERS:
        value = run.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Refused(f"{summary_path}: {key} is {value!r}, not a finite number; the run diverged or its "
                          "summary is incomplete")
    if not isinstance(run.get("config"), dict) or not isinstance(run.get("score_source"), str):
        raise Refused(f"{summary_path}: lacks its config or score_source; it was not written by a finished run")


def load_run(summary_path: Path) -> dict:
    run = read_summary(summary_path)
    check_finished_fields(run, summary_path)
    log_path = summary_path.with_suffix(".txt")
    if not log_path.is_file():
        raise Refused(f"{summary_path}: its log {log_path} is missing")
    log = log_path.read_text(encoding="utf-8")
    if SEPARATOR not in log:
        raise Refused(f"{log_path}: does not start with the script it ran")
    if not train_gpt.log_belongs_to(run, log):
        raise Refused(f"{summary_path}: its log {log_path} is from another run (no run_start_id:{run.get('run_start_id')})")
    run["_script"], run["_log"] = log.split(SEPARATOR, 1)[0], log_path
    return run


def check(runs: list[dict], track: str) -> None:
    """Raise Refused naming the first seed and reason that disqualify the set."""
    first = runs[0]
    base_config = {k: v for k, v in first["config"].items() if k not in PER_SEED_KEYS}
    for run in runs:
        seed = run.get("seed")
        if run.get("status") != "ok":
            raise Refused(f"seed {seed}: the run did not finish (status {run.get('status')!r}: {run.get('error')})")
        shipped = len(run["_script"].encode()) + run["model_bytes"]
        if shipped > LIMIT_BYTES:
            raise Refused(f"seed {seed}: {shipped} bytes (script {len(run['_script'].encode())} + model {run['model_bytes']}) "
                          f"> {LIMIT_BYTES}")
        violation = train_gpt.train_time_violation(data_seconds(run), LIMIT_SECONDS)
        if violation:
            raise Refused(f"seed {seed}: {violation}")
        if run.get("eval_seconds", 0.0) > LIMIT_SECONDS:
            raise Refused(f"seed {seed}: evaluation took {run['eval_seconds']:.1f}s > {LIMIT_SECONDS:g}s")
        if TRACKS[track] and not run.get("compliant", True):  # summaries of versions that had research modes
            raise Refused(f"seed {seed}: ran a non-compliant mode ({run.get('score_source')}); it cannot go on the record track")
        slot_scored = "slot" in str(run.get("score_source", "")) and run.get("compliant", True)  # older summaries too
        if TRACKS[track] and (run.get("ruling_pending") or slot_scored):
            raise Refused(f"seed {seed}: its score ({run.get('score_source')}) includes SLOT, whose legality awaits a "
                          "maintainer ruling (openai/parameter-golf issue #1336), so it is no record claim; rerun with "
                          "SLOT_ENABLED=0, or use --track non_record_16mb")
        config = {k: v for k, v in run["config"].items() if k not in PER_SEED_KEYS}
        if config != base_config:
            diff = sorted(k for k in set(config) | set(base_config) if config.get(k) != base_config.get(k))
            raise Refused(f"seed {seed}: its configuration differs from seed {first.get('seed')} in {', '.join(diff)}")
        if run["_script"] != first["_script"]:
            raise Refused(f"seed {seed}: it ran a different train_gpt.py than seed {first.get('seed')}")
        overlap = overlap_check(run)
        if overlap.get("status") == "overlap":
            raise Refused(f"seed {seed}: its training data holds validation text ({overlap_figures(overlap)}, found by "
                          "tools/check_overlap.py); rebuild the training shards without the validation documents "
                          "and rerun")
    seeds = [r.get("seed") for r in runs]
    if len(set(seeds)) != len(seeds):
        raise Refused(f"seeds {seeds}: each seed may appear once")


OVERLAP_STATUSES = ("clean", "overlap", "stale", "unreadable")  # tools/check_overlap.py's read_overlap_result


def overlap_check(run: dict) -> dict:
    """The train/validation overlap check the trainer found beside its data ({} when there was none)."""
    found = run.get("overlap_check")
    return found if isinstance(found, dict) and found.get("status") in OVERLAP_STATUSES else {}


def overlap_figures(check: dict) -> str:
    try:
        return (f"{check['overlapping_documents']:,} of {check['val_documents']:,} validation documents, "
                f"{check['overlapping_tokens']:,} of {check['val_tokens']:,} tokens, in {check['window']}-token spans "
                "or whole")
    except (KeyError, TypeError, ValueError):
        return "figures unreadable"


def overlap_warnings(runs: list[dict]) -> list[str]:
    """One line per kind of missing evidence, naming the seeds: never checked, stale, unreadable."""
    why = {None: "their training data was never checked for validation text: run `python3 tools/check_overlap.py "
                 "DATA_PATH` where they trained, then rerun (the trainer records the check)",
           "stale": "the overlap check beside their data no longer matches the shards (changed since it ran): rerun "
                    "`python3 tools/check_overlap.py DATA_PATH`, then the seeds",
           "unreadable": "the overlap check beside their data is unreadable: rerun `python3 tools/check_overlap.py "
                         "DATA_PATH`, then the seeds"}
    lines = []
    for status, reason in why.items():
        seeds = [str(r.get("seed")) for r in runs if overlap_check(r).get("status") == status]
        if seeds:
            lines.append(f"seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}: {reason}")
    return lines


def overlap_line(runs: list[dict]) -> str:
    """The README's sentence on data provenance."""
    checks = [overlap_check(r) for r in runs]
    if all(c.get("status") == "clean" for c in checks):
        c = checks[0]
        return (f"Train/validation overlap: none. `tools/check_overlap.py` (version {c.get('version')}, checked "
                f"{c.get('checked_at')}) found none of the {c.get('val_documents', 0):,} validation documents, whole "
                f"or in {c.get('window')}-token spans, in the {c.get('train_shards')} training shards.")
    return "Train/validation overlap: **not shown** (" + "; ".join(overlap_warnings(runs)) + ")."


def data_seconds(run: dict) -> float:
    """The seconds the time rule caps: training steps plus GPTQ calibration (a summary without calibration had none)."""
    return train_gpt.train_data_seconds(run["train_seconds"], run.get("hessian_seconds"))


def hardware(versions: dict) -> str:
    gpu, world = versions.get("gpu", "?"), versions.get("world_size", "?")
    return f"{world}x {gpu}" if gpu != "none" else f"CPU, {world} process(es)"


def fmt(value, spec=".5f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not (isinstance(value,
                                                                                      float) and math.isnan(value)) else "-"


def readme(name: str, track: str, runs: list[dict], sub: dict, sig_text: str | None) -> str:
    head = ("| seed | steps | ms/step | pre-quant | quantized | sliding | TTT | SLOT | val_bpb | artifact bytes | "
            "train s | artifact s | eval s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['seed']} | {r['steps']} | {fmt(r['ms_per_step'], '.1f')} | {fmt(r.get('pre_quant_val_bpb'))} | "
            f"{fmt(r.get('quantized_val_bpb'))} | {fmt(r.get('sliding_val_bpb'))} | {fmt(r.get('ttt_val_bpb'))} | "
            f"{fmt(r.get('slot_val_bpb'))} | {fmt(r['val_bpb'])} | {sub['seed_results'][str(r['seed'])]['artifact_bytes']} | "
            f"{fmt(data_seconds(r), '.1f')} | {fmt(r.get('artifact_production_seconds'), '.1f')} | "
            f"{fmt(r.get('eval_seconds'), '.1f')} |" for r in runs]
    first = runs[0]
    versions = first.get("versions", {})
    text = [f"# {name}", "",
            f"Track `{track}`. {len(runs)} seeds, mean val_bpb **{sub['val_bpb']:.5f}** ± {sub['val_bpb_std']:.5f} "
            f"(val_loss {sub['val_loss']:.5f} nats per token), scored by `{first['score_source']}`.", "",
            head, *rows, "",
            f"Artifact bytes count the shipped `train_gpt.py` ({len(first['_script'].encode())} bytes, "
            f"{'packed wrapper' if first.get('code_bytes_counted') == 'packed file' else 'raw source'}) plus the compressed model. "
            "Train seconds are the time training data was read: the timed steps plus GPTQ calibration (at most 600). "
            "Artifact seconds add quantization and compression, which read no data.", "",
            f"Run on {hardware(versions)}, torch {versions.get('torch', '?')}, "
            f"CUDA {versions.get('cuda', '?')}, attention {versions.get('attention_backend', '?')}.", "",
            overlap_line(runs), "",
            "## Reproduce", "", "From this folder, with the data downloaded (see the trainer's README):", "", "```bash"]
    knobs = {k: v for k, v in first["config"].items() if k not in PER_SEED_KEYS}
    text.append(" ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in sorted(knobs.items()))
                + " SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py")
    text += ["```", ""]
    if sig_text:
        text += ["## Significance", "", "```", sig_text, "```", ""]
    return "\n".join(text)


def submission(name: str, track: str, runs: list[dict], author: str, github_id: str, date: str, reference,
               rule: str = "frontier") -> dict:
    bpb, loss = [r["val_bpb"] for r in runs], [r["val_loss"] for r in runs]
    totals = {r["seed"]: len(r["_script"].encode()) + r["model_bytes"] for r in runs}
    versions = runs[0].get("versions", {})
    sub = dict(author=author, github_id=github_id, name=name, date=date, track=track,
               val_loss=statistics.fmean(loss), val_bpb=statistics.fmean(bpb),
               val_loss_std=statistics.stdev(loss) if len(runs) > 1 else 0.0,
               val_bpb_std=statistics.stdev(bpb) if len(runs) > 1 else 0.0,
               seeds=[r["seed"] for r in runs],
               seed_results={str(r["seed"]): dict(val_loss=r["val_loss"], val_bpb=r["val_bpb"],
                                                  artifact_bytes=totals[r["seed"]],
                                                  steps=r["steps"], step_avg_ms=r["ms_per_step"],
                                                  eval_time_s=r.get("eval_seconds"))
                             for r in runs},
               artifact_bytes_mean=statistics.fmean(totals.values()), artifact_bytes_max=max(totals.values()),
               bytes_total=max(totals.values()), train_steps_mean=statistics.fmean(r["steps"] for r in runs),
               step_avg_ms_mean=statistics.fmean(r["ms_per_step"] for r in runs),
               hardware=hardware(versions),
               pytorch_version=versions.get("torch"), cuda_version=versions.get("cuda"),
               attention_backend=versions.get("attention_backend"), score_source=runs[0]["score_source"],
               compliant=all(r.get("compliant", True) for r in runs),
               data_overlap_check=overlap_check(runs[0]) or None)
    if reference is not None:
        result = significance.compare(runs, reference, rule=rule)
        sub.update(comparison_baseline_bpb=result["reference_val_bpb"][0], delta_vs_leaderboard_bpb=-result["gain_bpb"],
                   delta_vs_leaderboard_nats=-result["gain_nats_per_token"], p_value=result["p_value"],
                   p_value_rule=rule)
    return sub


def check_folder_name(name: str, date: str) -> None:
    """The record folder is <date>_<name> under the track: neither part may lead out of it."""
    if not name or any(bad in name for bad in ("/", "\\", "..", "\0")):
        raise Refused(f"--name {name!r} must be a plain, non-empty folder name (no '/', '\\' or '..')")
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise Refused(f"--date {date!r} is not a date in the form YYYY-MM-DD") from None


def print_warning(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def make_record(summaries: list[Path], name: str, track: str = "10min_16mb", author: str = "", github_id: str = "",
                date: str | None = None, reference=None, out: Path = REPO_ROOT / "records", rule: str = "frontier",
                warn=print_warning) -> Path:
    """`reference`: a val_bpb, or run-like dicts (significance.load_reference); `warn` gets each warning line."""
    date = date or datetime.date.today().isoformat()
    check_folder_name(name, date)
    runs = [load_run(Path(p)) for p in summaries]
    check(runs, track)
    runs.sort(key=lambda r: r["seed"])
    folder = out / f"track_{track}" / f"{date}_{name}"
    if folder.exists():
        raise Refused(f"{folder} already exists; pick another --name or remove it")
    for line in overlap_warnings(runs):
        warn(line)
    sub = submission(name, track, runs, author, github_id, date, reference, rule)
    sig_text = significance.report(significance.compare(runs, reference, rule=rule)) if reference is not None else None
    folder.mkdir(parents=True)
    (folder / "train_gpt.py").write_text(runs[0]["_script"], encoding="utf-8")
    (folder / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
    (folder / "README.md").write_text(readme(name, track, runs, sub, sig_text), encoding="utf-8")
    shutil.copy(REPO_ROOT / "requirements.txt", folder / "requirements.txt")
    for r in runs:
        shutil.copy(r["_log"], folder / f"train_seed{r['seed']}.log")
    return folder


def parse_reference(text: str):
    """A record folder's seeds, run summaries from a file or folder, else a finite val_bpb."""
    return significance.load_reference([text])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path,
                        help="logs/<RUN_ID>.json, one per seed (the .txt beside each)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--track", choices=sorted(TRACKS), default="10min_16mb")
    parser.add_argument("--author", default="")
    parser.add_argument("--github-id", default="")
    parser.add_argument("--date", help="YYYY-MM-DD (default: today)")
    parser.add_argument("--reference", help="the row to beat: its record folder (its seeds' scores), a folder of its "
                                            "run summaries, or its val_bpb")
    parser.add_argument("--rule", choices=significance.RULES, default="frontier",
                        help="which verdict's p-value submission.json carries (see tools/significance.py)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "records")
    args = parser.parse_args(argv)
    reference = parse_reference(args.reference) if args.reference else None
    try:
        folder = make_record(args.summaries, args.name, args.track, args.author, args.github_id, args.date, reference,
                             args.out, args.rule)
    except Refused as e:
        raise SystemExit(f"refused: {e}") from None
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
