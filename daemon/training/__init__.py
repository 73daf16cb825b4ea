"""The learning core: seed model, stage planning, packed LoRA training, evaluation.

Only subprocesses import torch: the daemon process imports :mod:`daemon.training.runner`
(with :mod:`~daemon.training.spawn`, :mod:`~daemon.training.finish` and
:mod:`~daemon.training.scoring`) and :mod:`daemon.training.plan`, which stay torch-free so
its idle RSS stays small. This package never imports :mod:`daemon.serving`: promotion is a
``promote(version, reason)`` callable the daemon or the CLI hands to the runner.
"""
