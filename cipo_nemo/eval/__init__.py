"""Evaluation: metrics (pass@k) and, later, the benchmark harness."""
