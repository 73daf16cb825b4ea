"""Evergreen: a continual-learning daemon for LLMs."""

__version__ = "0.1.0"
