"""The plotting command moved into the product (plot.py at the repo root; every trainer now draws its own
metrics.png). This keeps `python dev/plot.py RUN [RUN ...] --output PNG` working for several runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plot import PANELS, PlotError, main, plot_metrics, read_metrics, run_label  # noqa: E402,F401

if __name__ == "__main__":
    main()
