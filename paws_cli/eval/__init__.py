"""Evaluation of learned representations: nearest-neighbour classifiers and accuracy metrics."""
