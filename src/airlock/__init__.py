"""Airlock: run an experiment's batch jobs on untrusted volunteer computers."""

__version__ = "0.1.0"
