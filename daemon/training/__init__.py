"""The learning core: seed model, stage planning, packed LoRA training, evaluation.

Only subprocesses import torch: the daemon process imports :mod:`daemon.training.runner`
and :mod:`daemon.training.plan`, which stay torch-free so its idle RSS stays small.
"""
