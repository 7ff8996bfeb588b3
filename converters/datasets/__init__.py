"""Datasets the project ships: generated, deterministic, with a held-out split."""
