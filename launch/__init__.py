"""Launchers: torchrun wrapper, Slurm batch scripts, DeepSpeed hostfiles (see launch/README.md)."""
