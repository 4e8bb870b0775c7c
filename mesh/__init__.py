"""Sluice control plane and the `sluice` command line."""
