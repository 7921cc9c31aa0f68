"""Offline data preparation: dataset conversion and labelled-split generation (used by the CLI)."""
