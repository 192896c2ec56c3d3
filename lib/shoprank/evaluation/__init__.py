"""Evaluation: one evaluator per protocol, the metrics, the baselines and the report."""
