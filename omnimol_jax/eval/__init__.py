"""Evaluation: per-task metrics in the `reference` and `strict` protocols (docs/omnimol.md §6) and reports."""
from omnimol_jax.eval.metrics import (
    compute_metrics_from_records,
    compute_task_metrics,
    compute_task_metrics_both,
    text_metrics,
)
from omnimol_jax.eval.mol_metrics import PROTOCOL_REFERENCE, PROTOCOL_STRICT, PROTOCOLS
from omnimol_jax.eval.report import PredictionStore, markdown_table, plot_summary, read_predictions, write_report

__all__ = [
    "PROTOCOLS", "PROTOCOL_REFERENCE", "PROTOCOL_STRICT", "PredictionStore", "compute_metrics_from_records",
    "compute_task_metrics", "compute_task_metrics_both", "markdown_table", "plot_summary", "read_predictions",
    "text_metrics", "write_report",
]
