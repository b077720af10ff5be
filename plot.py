"""Plot the metrics.jsonl of one or several training runs to a PNG: loss (and val/loss); for DPO/SimPO the
rewards of chosen and rejected responses, the reward accuracy and the margin; for GRPO the reward, the KL and
the completions' length.

    python plot.py outputs/sft                                   # outputs/sft/metrics.png
    python plot.py outputs/sft/metrics.jsonl outputs/dpo/metrics.jsonl --output plot.png

A run dir works in place of its metrics.jsonl. Each run is one colour, labelled with its dir name. Every
trainer draws its own run's metrics.png this way, at the end and at its checkpoints (train_common.draw_metrics).
matplotlib is imported only to draw: the trainers run without it.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# (panel title, [(metric key, line style)]): a panel is drawn when any run logged one of its keys.
PANELS = [
    ("loss", [("loss", "-"), ("val/loss", "--")]),
    ("rewards/chosen, rewards/rejected (dashed)", [("rewards/chosen", "-"), ("rewards/rejected", "--")]),
    ("rewards/accuracies", [("rewards/accuracies", "-")]),
    ("rewards/margins", [("rewards/margins", "-")]),
    ("reward (GRPO), reward_std (dashed)", [("reward", "-"), ("reward_std", "--")]),
    ("kl", [("kl", "-")]),
    ("completions/mean_length", [("completions/mean_length", "-")]),
]


NO_MATPLOTLIB = "drawing needs matplotlib: pip install matplotlib"


class PlotError(ValueError):
    """A metrics file that is missing, empty or malformed (names the file and line)."""


def read_metrics(path) -> list[dict]:
    """The steps of a metrics.jsonl (or of the one in a run dir). A last line cut short by a run still
    writing is skipped; any other bad line is an error naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} not found (a trainer writes metrics.jsonl into its --output_dir)")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):
                break
            raise PlotError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise PlotError(f"{path}:{lineno}: expected an object with a numeric 'step'")
        rows.append(row)
    if not rows:
        raise PlotError(f"{path} is empty: the run has logged no step yet")
    return rows


def run_label(path, others) -> str:
    """A run's name: its dir's (outputs/sft/metrics.jsonl -> sft), or the file's for another file name
    (results/dpo.jsonl -> dpo); the path as given when two runs share a name."""
    def name(p):
        p = Path(p).resolve()  # "metrics.jsonl" in the working dir still has a dir name
        return p.name if p.is_dir() else p.parent.name if p.name == "metrics.jsonl" else p.stem

    names = [name(o) for o in others]
    return name(path) if names.count(name(path)) == 1 else str(path)


def plot_metrics(paths, output) -> Path:
    """Draw every panel some run has data for into one PNG, written under a temp name and renamed (a run killed
    while drawing leaves the previous PNG whole); returns its path. matplotlib's Figure without pyplot: no
    display, no global figure state, safe inside a training process."""
    import matplotlib
    from matplotlib.figure import Figure

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise PlotError("no metrics files given")
    runs = [(run_label(p, paths), read_metrics(p)) for p in paths]
    panels = [(title, series) for title, series in PANELS
              if any(key in row for _, rows in runs for row in rows for key, _ in series)]
    if not panels:
        keys = [key for _, series in PANELS for key, _ in series]
        raise PlotError(f"nothing to plot: no step of {', '.join(map(str, paths))} logged any of {keys}")
    cols = 1 if len(panels) == 1 else 2
    nrows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6 * cols, 3.6 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, series) in zip(axes.flat, panels):
        for i, (label, rows) in enumerate(runs):
            for key, style in series:
                points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                xs, ys = zip(*points)
                name = label if style == "-" else f"{label} ({key})"
                ax.plot(xs, ys, style, color=colors[i % len(colors)], label=name,
                        marker="o" if len(points) < 20 and key == "val/loss" else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    output = Path(output)
    if output.is_dir():
        output = output / "metrics.png"
    elif not output.suffix:  # matplotlib would add ".png" itself, and we would report another name
        output = output.with_suffix(".png")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("metrics", nargs="+", type=Path, help="metrics.jsonl files (or run dirs holding one)")
    ap.add_argument("--output", type=Path, default=None,
                    help="PNG to write (default: metrics.png beside the first metrics file)")
    args = ap.parse_args(argv)
    first = args.metrics[0]
    output = args.output or (first if first.is_dir() else first.parent) / "metrics.png"
    try:
        print(f"wrote {plot_metrics(args.metrics, output)}")
    except PlotError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except ModuleNotFoundError as e:
        if e.name != "matplotlib":
            raise
        print(f"plot.py: error: {NO_MATPLOTLIB}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
