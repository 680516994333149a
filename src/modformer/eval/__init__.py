"""Evaluation: language-model loss, costs, downstream tasks."""
