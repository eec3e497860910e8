"""Metrics for monitoring (`collector.py`) and their settings (`settings.py`)."""
