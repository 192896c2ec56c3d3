"""Serving: what the Ray Serve app (lib/shoprank/serving/app.py, run by serve/config.yaml) is
made of, testable without Serve."""
