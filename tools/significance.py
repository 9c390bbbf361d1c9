"""Is a set of runs better than a reference, by how much, in which unit, and how sure?

    python3 tools/significance.py logs/new_s*.json --reference path/to/2026-05-01_SP8192_PR2130Base_Calib32
    python3 tools/significance.py logs/new_s*.json --reference 1.05651
    python3 tools/significance.py logs/new_s*.json --reference logs/old_s*.json

The reference is a record folder (its submission.json's per-seed scores, else the final score line of each
train_seed<N>.log), other run summaries, or a bare val_bpb. Against seeds the test is a one-sided Welch t-test, so
the reference row's own spread counts; against a number, a one-sided one-sample t-test. Improvements are printed in
bpb, in nats per token (the unit of submission.json's delta_vs_leaderboard_nats) and in nats per byte (bpb x ln 2).
The verdict applies --rule: "frontier" (default), the chronological-frontier practice the maintainers adopted
(openai/parameter-golf PR #1902: any improvement over the current row at p < 0.25), or "readme", the challenge
README's rule (an improvement of at least 0.005 nats shown at p < 0.01, H0: improvement <= 0.005) in the unit --unit
names (default: nats per token). Both are always printed.
"""
import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

LN2 = math.log(2)


def load_summaries(paths) -> list[dict]:
    """Finished run summaries (logs/<RUN_ID>.json with status ok); folders are searched."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    runs = []
    for f in files:
        try:
            s = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {f} is not a readable run summary ({e})")
        if s.get("status") != "ok" or "val_bpb" not in s:
            raise SystemExit(f"error: {f} is not a finished run (status {s.get('status')!r}); rerun or leave it out")
        s["_path"] = str(f)
        runs.append(s)
    if not runs:
        raise SystemExit(f"error: no run summaries in {' '.join(map(str, paths))}")
    return runs


SCRIPT_SEPARATOR = "\n" + "=" * 100 + "\n"  # train_gpt.py's log: its script text, this line, then the run
# A final score line: train_gpt.py's "final_score val_loss:2.3120 val_bpb:1.0565 source:...", or the challenge
# scripts' "quantized_ttt_phased val_loss:2.31265572 val_bpb:1.05679341 eval_time:567097ms" (and their older
# "final_int8_zlib_roundtrip_exact ..." kin). Periodic validation lines ("step:500/20000 val_loss:...",
# "4000/20000 val_loss: 2.42 ...") are not scores.
SCORE = re.compile(r"\bval_loss:\s*([0-9.]+)\s+val_bpb:\s*([0-9.]+)")
STEP_LINE = re.compile(r"^\s*(step:)?\d+/\d+\b")
SEED_IN_NAME = re.compile(r"seed_?(\d+)\.(log|txt)$")
RULES = ("frontier", "readme")
FRONTIER_P = 0.25


def log_score(text: str) -> tuple[float, float] | None:
    """(val_loss, val_bpb) of a training log's final score line, or None if it has none."""
    if SCRIPT_SEPARATOR in text:
        text = text.split(SCRIPT_SEPARATOR, 1)[1]  # not the script's own source
    lines = text.splitlines()
    finals = [line for line in lines if line.startswith("final_score ") and SCORE.search(line)]
    scored = finals or [line for line in lines if SCORE.search(line) and not STEP_LINE.match(line)]
    if not scored:
        return None
    loss, bpb = SCORE.search(scored[-1]).groups()
    return float(loss), float(bpb)


def is_record_folder(path: Path) -> bool:
    """A record folder holds a submission.json or train_seed<N>.log files (run summaries are <RUN_ID>.json)."""
    if path.is_file():
        return path.name == "submission.json"
    return path.is_dir() and ((path / "submission.json").is_file() or bool(seed_logs(path)))


def seed_logs(folder: Path) -> dict[int, Path]:
    """train_seed<N>.log (or train_seed_<N>.txt) by seed."""
    logs = {}
    for f in sorted(folder.iterdir()):
        match = SEED_IN_NAME.search(f.name)
        if match and f.name.startswith("train"):
            seed = int(match.group(1))
            if seed in logs:
                raise SystemExit(f"error: {folder} has two logs for seed {seed} ({logs[seed].name}, {f.name}); "
                                 "keep one")
            logs[seed] = f
    return logs


def load_record(path) -> list[dict]:
    """Per-seed scores of a record folder (or its submission.json), as run-like dicts: seed_results from
    submission.json where it has them, else each train_seed<N>.log's final score line. A seed whose val_loss neither
    gives has val_loss None (compare() then derives it from val_bpb)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    logs = seed_logs(folder)
    per_seed = {}
    submission = folder / "submission.json"
    if submission.is_file():
        try:
            per_seed = json.loads(submission.read_text(encoding="utf-8")).get("seed_results") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise SystemExit(f"error: {submission} is not a readable submission.json ({e})") from None
        if not isinstance(per_seed, dict):
            per_seed = {}
    runs = []
    if per_seed:
        for seed, scores in per_seed.items():
            bpb = scores.get("val_bpb") if isinstance(scores, dict) else None
            if not isinstance(bpb, (int, float)):
                raise SystemExit(f"error: {submission}: seed_results[{seed!r}] has no val_bpb")
            loss = scores.get("val_loss")
            if not isinstance(loss, (int, float)) and str(seed).isdigit() and int(seed) in logs:
                from_log = log_score(logs[int(seed)].read_text(encoding="utf-8", errors="replace"))
                loss = from_log[0] if from_log else None
            runs.append(dict(seed=int(seed) if str(seed).isdigit() else seed, val_bpb=float(bpb),
                             val_loss=float(loss) if isinstance(loss, (int, float)) else None, status="ok",
                             _path=str(submission)))
    else:
        for seed, log in logs.items():
            score = log_score(log.read_text(encoding="utf-8", errors="replace"))
            if score is None:
                raise SystemExit(f"error: {log} has no final score line (val_loss:... val_bpb:...)")
            runs.append(dict(seed=seed, val_loss=score[0], val_bpb=score[1], status="ok", _path=str(log)))
    if not runs:
        raise SystemExit(f"error: {folder} has no per-seed scores (no seed_results in a submission.json, no "
                         "train_seed<N>.log); give the row's val_bpb as a number instead")
    return sorted(runs, key=lambda r: str(r["seed"]).zfill(12))


def load_reference(values: list[str]):
    """--reference: a record folder (or its submission.json), run summaries (files or folders), or a val_bpb."""
    paths = [Path(v) for v in values]
    if len(values) == 1 and not paths[0].exists():
        try:
            value = float(values[0])
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise SystemExit(f"error: --reference {values[0]!r} is neither a finite val_bpb nor an existing record "
                             "folder or run summary")
        return value
    if len(paths) == 1 and is_record_folder(paths[0]):
        return load_record(paths[0])
    return load_summaries(values)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (SciPy's when installed)."""
    try:
        from scipy import stats
        return float(stats.t.sf(t, df))
    except ImportError:
        return t_sf_builtin(t, df)


def t_sf_builtin(t: float, df: float) -> float:
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1 - tail


def mean_std(values) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def welch_p(ref: list[float], new: list[float], margin: float) -> tuple[float, float, float]:
    """(t, df, p) of the one-sided Welch test that mean(ref) - mean(new) > margin."""
    (m1, s1), (m2, s2) = mean_std(ref), mean_std(new)
    v1, v2 = s1 * s1 / len(ref), s2 * s2 / len(new)
    if not (v1 + v2 > 0):
        return float("nan"), float("nan"), float("nan")
    t = (m1 - m2 - margin) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 * v1 / (len(ref) - 1) + v2 * v2 / (len(new) - 1))
    return t, df, t_sf(t, df)


def one_sample_p(ref_value: float, new: list[float], margin: float) -> tuple[float, float, float]:
    """(t, df, p) of the one-sided one-sample test that ref_value - mean(new) > margin."""
    m, s = mean_std(new)
    if len(new) < 2 or not s > 0:
        return float("nan"), float("nan"), float("nan")
    t = (ref_value - m - margin) / (s / math.sqrt(len(new)))
    return t, len(new) - 1, t_sf(t, len(new) - 1)


def compare(runs: list[dict], reference, threshold: float = 0.005, alpha: float = 0.01, unit: str = "token",
            rule: str = "frontier") -> dict:
    """Everything the report prints. `reference`: a val_bpb number, or a list of summaries or record seeds (a seed
    without val_loss gets its val_bpb in nats per token at the runs' bytes per token)."""
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: one of {', '.join(RULES)}")
    bpb = [r["val_bpb"] for r in runs]
    nats_token = [r["val_loss"] for r in runs]
    bytes_per_token = statistics.fmean(r["val_loss"] / (r["val_bpb"] * LN2) for r in runs)
    fixed = isinstance(reference, (int, float))
    derived = 0
    if fixed:
        ref_bpb, ref_tok = [float(reference)], [float(reference) * LN2 * bytes_per_token]
    else:
        ref_bpb = [r["val_bpb"] for r in reference]
        ref_tok = [r["val_loss"] if r.get("val_loss") is not None else r["val_bpb"] * LN2 * bytes_per_token
                   for r in reference]
        derived = sum(r.get("val_loss") is None for r in reference)
    scale = 1.0 if unit == "token" else 1 / bytes_per_token  # the rule's unit, from nats per token
    gain_bpb = statistics.fmean(ref_bpb) - statistics.fmean(bpb)
    result = dict(n=len(runs), val_bpb=mean_std(bpb), val_loss=mean_std(nats_token), bytes_per_token=bytes_per_token,
                  reference_n=len(ref_bpb), reference_val_bpb=mean_std(ref_bpb),
                  gain_bpb=gain_bpb, gain_nats_per_byte=gain_bpb * LN2,
                  gain_nats_per_token=statistics.fmean(ref_tok) - statistics.fmean(nats_token),
                  test="one-sample" if fixed else "Welch", unit=unit, threshold=threshold, alpha=alpha,
                  rule=rule, reference_losses_derived=derived)
    ref_u, new_u = [v * scale for v in ref_tok], [v * scale for v in nats_token]
    test = (lambda margin: one_sample_p(ref_u[0], new_u, margin)) if fixed else (lambda margin: welch_p(ref_u, new_u,
                                                                                                        margin))
    result["t"], result["df"], result["p_threshold"] = test(threshold)
    result["p_any"] = test(0.0)[2]
    gain_u = result["gain_nats_per_token"] * scale
    result["passes_rule"] = bool(gain_u >= threshold and result["p_threshold"] < alpha)
    result["passes_progression"] = bool(gain_u > 0 and result["p_any"] < FRONTIER_P)
    result["passes"] = result["passes_progression"] if rule == "frontier" else result["passes_rule"]
    result["p_value"] = result["p_any"] if rule == "frontier" else result["p_threshold"]  # the verdict's p
    return result


def report(r: dict) -> str:
    unit_name = "nats per token" if r["unit"] == "token" else "nats per byte"
    lines = [
        f"runs:      n={r['n']}  val_bpb {r['val_bpb'][0]:.6f} ± {r['val_bpb'][1]:.6f}  val_loss {r['val_loss'][0]:.6f} ± {r['val_loss'][1]:.6f} nats/token (mean ± std)",
        f"reference: n={r['reference_n']}  val_bpb {r['reference_val_bpb'][0]:.6f}"
        + (" (a fixed number)" if r["test"] == "one-sample" else f" ± {r['reference_val_bpb'][1]:.6f}"),
        f"improvement: {r['gain_bpb']:+.6f} bpb | {r['gain_nats_per_token']:+.6f} nats per token | {r['gain_nats_per_byte']:+.6f} nats per byte"
        f"  ({r['bytes_per_token']:.4f} bytes per token)",
        f"{r['test']} t-test, one-sided, in {unit_name}: p(improvement > 0) = {r['p_any']:.4g}; "
        f"p(improvement > {r['threshold']}) = {r['p_threshold']:.4g} (t = {r['t']:.3f}, df = {r['df']:.2f})",
    ]
    frontier = (f"the p < {FRONTIER_P} frontier rule (PR #1902: any improvement over the current row), in "
                f"{unit_name}: ")
    readme = f"the README rule (>= {r['threshold']} nats at p < {r['alpha']}), applied in {unit_name}: "
    if r.get("rule", "frontier") == "frontier":
        lines += ["verdict: " + frontier + ("PASSES" if r["passes_progression"] else "does NOT pass"),
                  "   also: " + readme + ("passes" if r["passes_rule"] else "does not pass")]
    else:
        lines += ["verdict: " + readme + ("PASSES" if r["passes_rule"] else "does NOT pass"),
                  "   also: " + frontier + ("passes" if r["passes_progression"] else "does not pass")]
    if r.get("reference_losses_derived"):
        lines.append(f"note: {r['reference_losses_derived']} reference seed(s) gave no val_loss; their nats per token "
                     f"are their val_bpb at the runs' {r['bytes_per_token']:.4f} bytes per token")
    if r["n"] < 2 or (r["test"] == "Welch" and r["reference_n"] < 2):
        lines.append("note: a side with one run has no spread; run more seeds for a p-value")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run summaries (logs/<RUN_ID>.json) or folders of them")
    parser.add_argument("--reference", nargs="+", required=True,
                        help="the row to beat: its record folder (or submission.json), its run summaries, or its "
                             "val_bpb")
    parser.add_argument("--rule", choices=RULES, default="frontier",
                        help="the verdict: frontier (p < 0.25 for any improvement, PR #1902; default) or readme "
                             "(>= --threshold nats at p < --alpha)")
    parser.add_argument("--threshold", type=float, default=0.005, help="nats (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--unit", choices=("token", "byte"), default="token", help="unit the rules are applied in")
    args = parser.parse_args(argv)
    reference = load_reference(args.reference)
    print(report(compare(load_summaries(args.runs), reference, args.threshold, args.alpha, args.unit, args.rule)))


if __name__ == "__main__":
    sys.exit(main())
