"""Is a set of runs better than a reference, by how much, in which unit, and how sure?

    python3 tools/significance.py logs/new_s*.json --reference 1.0810
    python3 tools/significance.py logs/new_s*.json --reference logs/old_s*.json

The reference is a val_bpb number (then a one-sided one-sample t-test of the runs against it) or
another set of run summaries (then a one-sided Welch t-test). Improvements are printed in bpb,
in nats per token (the unit of submission.json's delta_vs_leaderboard_nats) and in nats per byte
(bpb x ln 2). The verdict applies the challenge README's rule, an improvement of at least 0.005
nats shown at p < 0.01 (H0: improvement <= 0.005), in the unit chosen by --unit (default: nats per
token), and also reports the p < 0.25 progression practice the maintainers adopted later.
"""
import argparse
import json
import math
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


def compare(runs: list[dict], reference, threshold: float = 0.005, alpha: float = 0.01, unit: str = "token") -> dict:
    """Everything the report prints. `reference`: a val_bpb number, or a list of summaries."""
    bpb = [r["val_bpb"] for r in runs]
    nats_token = [r["val_loss"] for r in runs]
    bytes_per_token = statistics.fmean(r["val_loss"] / (r["val_bpb"] * LN2) for r in runs)
    fixed = isinstance(reference, (int, float))
    if fixed:
        ref_bpb, ref_tok = [float(reference)], [float(reference) * LN2 * bytes_per_token]
    else:
        ref_bpb, ref_tok = [r["val_bpb"] for r in reference], [r["val_loss"] for r in reference]
    scale = 1.0 if unit == "token" else 1 / bytes_per_token  # the rule's unit, from nats per token
    gain_bpb = statistics.fmean(ref_bpb) - statistics.fmean(bpb)
    result = dict(n=len(runs), val_bpb=mean_std(bpb), val_loss=mean_std(nats_token), bytes_per_token=bytes_per_token,
                  reference_n=len(ref_bpb), reference_val_bpb=mean_std(ref_bpb),
                  gain_bpb=gain_bpb, gain_nats_per_byte=gain_bpb * LN2,
                  gain_nats_per_token=statistics.fmean(ref_tok) - statistics.fmean(nats_token),
                  test="one-sample" if fixed else "Welch", unit=unit, threshold=threshold, alpha=alpha)
    ref_u, new_u = [v * scale for v in ref_tok], [v * scale for v in nats_token]
    test = (lambda margin: one_sample_p(ref_u[0], new_u, margin)) if fixed else (lambda margin: welch_p(ref_u, new_u,
                                                                                                        margin))
    result["t"], result["df"], result["p_threshold"] = test(threshold)
    result["p_any"] = test(0.0)[2]
    gain_u = result["gain_nats_per_token"] * scale
    result["passes_rule"] = bool(gain_u >= threshold and result["p_threshold"] < alpha)
    result["passes_progression"] = bool(gain_u > 0 and result["p_any"] < 0.25)
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
        f"verdict: the README rule (>= {r['threshold']} nats at p < {r['alpha']}), applied in {unit_name}: "
        + ("PASSES" if r["passes_rule"] else "does NOT pass"),
        "         the p < 0.25 progression practice (any improvement): " + ("passes" if r["passes_progression"] else "does not pass"),
    ]
    if r["n"] < 2 or (r["test"] == "Welch" and r["reference_n"] < 2):
        lines.append("note: a side with one run has no spread; run more seeds for a p-value")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run summaries (logs/<RUN_ID>.json) or folders of them")
    parser.add_argument("--reference", nargs="+", required=True, help="a val_bpb number, or reference summaries")
    parser.add_argument("--threshold", type=float, default=0.005, help="nats (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--unit", choices=("token", "byte"), default="token", help="unit the rule is applied in")
    args = parser.parse_args(argv)
    try:
        reference = float(args.reference[0]) if len(args.reference) == 1 and not Path(args.reference[0]).exists() else None
    except ValueError:
        raise SystemExit(f"error: --reference {args.reference[0]!r} is neither a number nor a summary file") from None
    if reference is None:
        reference = load_summaries(args.reference)
    print(report(compare(load_summaries(args.runs), reference, args.threshold, args.alpha, args.unit)))


if __name__ == "__main__":
    sys.exit(main())
