"""Data: datasets, label splits, augmentations and the PAWS samplers."""
