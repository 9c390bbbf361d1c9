"""Plot training loss and validation bpb against step and against time, one colour per run.

    python3 tools/plot.py logs/mytry_s*.json --out mytry.png --reference 1.0810

Four panels: train loss by step and by seconds, val_bpb (periodic live-weight checks, then the
run's final score as a star) by step and by seconds; --reference draws a horizontal line on the
val_bpb panels. Needs matplotlib (`pip install matplotlib`), which the trainer does not.
"""
import argparse
import json
import sys
from pathlib import Path


def plot(summaries: list[dict], out: Path, reference: float | None = None) -> dict:
    """Write the PNG; returns {panel title: number of line series drawn}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: tools/plot.py needs matplotlib; install it with `pip install matplotlib`") from None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = {(0, 0): ("train loss by step", "train_curve", 0, 2), (0, 1): ("train loss by time", "train_curve", 1, 2),
              (1, 0): ("val_bpb by step", "val_curve", 0, 3), (1, 1): ("val_bpb by time", "val_curve", 1, 3)}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, s in enumerate(summaries):
        colour, label = colours[i % len(colours)], f"seed {s.get('seed')} ({s.get('run_id')})"
        for (r, c), (title, curve, x, y) in panels.items():
            points = s.get(curve) or []
            axes[r, c].plot([p[x] for p in points], [p[y] for p in points], color=colour, label=label)
            if curve == "val_curve" and "val_bpb" in s:  # the final score, after quantization and eval
                axes[r, c].plot([s["steps"] if x == 0 else s["train_seconds"]], [s["val_bpb"]], "*", color=colour,
                                markersize=10)
    for (r, c), (title, _, x, _) in panels.items():
        ax = axes[r, c]
        if reference is not None and r == 1:
            ax.axhline(reference, color="black", linestyle="--", label=f"reference {reference}")
        ax.set_title(title)
        ax.set_xlabel("step" if x == 0 else "training seconds")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    series = {axes[r, c].get_title(): sum(1 for line in axes[r, c].get_lines() if line.get_linestyle() == "-")
              for (r, c) in panels}
    plt.close(fig)
    return series


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("plot.png"))
    parser.add_argument("--reference", type=float)
    args = parser.parse_args(argv)
    summaries = []
    for p in args.summaries:
        try:
            summaries.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {p} is not a readable run summary ({e})")
    series = plot(summaries, args.out, args.reference)
    print(f"wrote {args.out}: " + ", ".join(f"{k}: {v} runs" for k, v in series.items()))


if __name__ == "__main__":
    sys.exit(main())
