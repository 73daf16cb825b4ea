"""Synthetic study text with lineage: a worker like ingest, training and serving.

It reads pending train chunks from the store, rewrites them with the configured method
(:mod:`policies.augment`: permutations, sentences, or the served model's paraphrases and
Q/A pairs), filters the results like ingest filters documents, and stores them as
synthetic chunks tied to their source (:mod:`store.synthetic`). It never imports the
other workers; the service calls :func:`augment_pending` after ingest.
"""

from daemon.augment.runner import AugmentReport, augment_pending

__all__ = ["AugmentReport", "augment_pending"]
