"""Tiny seed model fixtures (owned by the training work)."""
