"""Prefect flows: they orchestrate DVC stages and hold no data or model logic."""
