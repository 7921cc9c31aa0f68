"""The shared training machinery: run directories, checkpoints, metrics and the loop."""
