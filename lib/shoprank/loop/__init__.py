"""The continuous-learning loop: served impressions and feedback -> retraining on the newest
days -> the gate -> the Serve app following production (`retrain.py`), and the simulated
shop that shows it paying off (`simulate.py`, bench/bench_loop.py)."""
