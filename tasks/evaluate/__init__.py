"""Evaluation of a generated dataset: per-row figures, the job, the report."""
