"""Labelled/unlabelled split files: reading, writing and drawing them, and the shipped official lists."""
