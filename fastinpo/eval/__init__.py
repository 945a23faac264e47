"""Evaluation: sampling from a pipeline (``sampling``), reward models (``scorers``), scoring and win rates of
checkpoints (``evaluate``).

Layer rule (docs/ARCHITECTURE.md): imports only the layers below it (methods, models, data, ops, config)."""
