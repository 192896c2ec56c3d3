"""Serving: what the Ray Serve app (serve/app.py) is made of, testable without Serve."""
