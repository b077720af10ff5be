"""plot.py: SFT- and DPO-style metrics.jsonl files to a PNG; clear errors for missing or empty files."""

import json
import math
import struct
import subprocess
import sys

import pytest

from dev import plot
from sft_fixtures import REPO, env


def write_metrics(run_dir, kind: str, steps: int = 30):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            row = {"step": step, "loss": 2.0 * math.exp(-step / 10), "lr": 1e-5, "grad_norm": 1.0, "tokens": 512,
                   "tokens_per_s": 1000.0}
            if kind == "sft" and step % 10 == 0:
                row["val/loss"] = 2.2 * math.exp(-step / 12)
            if kind == "dpo":
                row.update({"rewards/chosen": 0.01 * step, "rewards/rejected": -0.02 * step,
                            "rewards/accuracies": min(1.0, 0.5 + step / 40), "rewards/margins": 0.03 * step,
                            "logps/chosen": -40.0, "logps/rejected": -45.0})
            f.write(json.dumps(row) + "\n")
    return run_dir / "metrics.jsonl"


def png_size(path):
    """(width, height) from the PNG signature and IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_sft_and_dpo_runs_to_png(tmp_path):
    sft = write_metrics(tmp_path / "sft", "sft")
    dpo = write_metrics(tmp_path / "dpo", "dpo")
    w1, h1 = png_size(plot.plot_metrics([sft], tmp_path / "sft.png"))  # one panel: loss and val/loss
    w4, h4 = png_size(plot.plot_metrics([dpo], tmp_path / "dpo.png"))  # four panels in a 2x2 grid
    assert w4 > w1 and h4 > h1
    png_size(plot.plot_metrics([sft, tmp_path / "dpo"], tmp_path / "out" / "both.png"))  # a run dir works too
    assert plot.run_label(sft, [sft, dpo]) == "sft"
    # files named after their runs in one dir; and a metrics.jsonl given relative to the working dir
    runs = [tmp_path / "results" / "sft.jsonl", tmp_path / "results" / "dpo.jsonl"]
    assert [plot.run_label(p, runs) for p in runs] == ["sft", "dpo"]
    assert plot.run_label("metrics.jsonl", ["metrics.jsonl"]) == plot.Path.cwd().name
    # an output without a suffix gets ".png", and that is the name reported
    assert plot.plot_metrics([sft], tmp_path / "noext") == tmp_path / "noext.png"
    png_size(tmp_path / "noext.png")


def test_command_line(tmp_path):
    """As a user runs it (headless: MPLBACKEND unset, no display); the default output sits beside the file."""
    dpo = write_metrics(tmp_path / "runs" / "dpo", "dpo")
    with open(dpo, "a") as f:
        f.write('{"step": 31, "loss"')  # a run still writing: the cut-short last line is skipped
    r = subprocess.run([sys.executable, str(REPO / "dev" / "plot.py"), str(dpo)], capture_output=True, text=True,
                       env={k: v for k, v in env().items() if k not in ("DISPLAY", "MPLBACKEND")}, timeout=60)
    assert r.returncode == 0, r.stderr
    png_size(tmp_path / "runs" / "dpo" / "metrics.png")


def test_errors(tmp_path, capsys):
    with pytest.raises(plot.PlotError, match="not found"):
        plot.plot_metrics([tmp_path / "nope" / "metrics.jsonl"], tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "empty" / "metrics.jsonl"), "--output", str(tmp_path / "x.png")])
    assert e.value.code == 1
    assert "metrics.jsonl is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(plot.PlotError, match="bad.jsonl:2"):
        plot.read_metrics(bad)
    bad.write_text('{"step": 1, "lr": 1e-5}\n')
    with pytest.raises(plot.PlotError, match="nothing to plot: no step of .*bad.jsonl logged any of"):
        plot.plot_metrics([bad], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
