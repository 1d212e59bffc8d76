"""Benchmarks that print JSON: `dgemma bench` (speed.py), `dgemma bench serve` (serve.py), `dgemma bench train`
(train.py), and peak-memory tracking (memtrack.py)."""
