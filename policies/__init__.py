"""Policies: when to train (triggers), what to replay, what to promote.

Small classes behind three Protocols in :mod:`policies.base`, found by name through a
registry, built from config. Policies are pure functions of a state snapshot and a clock,
so they are unit-tested with a fake clock; anything needing a model (losses) is computed
by a subprocess and read from the store's ``chunk_scores``.
"""
