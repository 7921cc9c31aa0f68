"""Launchers that run `paws pretrain` somewhere other than this process (SLURM through submitit)."""
