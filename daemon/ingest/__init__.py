"""Exactly-once ingestion of inbox files into the store.

``parsers`` turns bytes into text or chat examples by suffix, ``clean`` normalises and
filters them, ``chunking`` cuts them into token windows with a train/holdout split,
``pipeline`` decides what each file means for the store (new, duplicate, new version,
quarantined) and ``watcher`` feeds it from the inbox. Bad input never raises out of here:
it becomes a quarantined document with a reason.
"""

from daemon.ingest.outcome import Outcome
from daemon.ingest.pipeline import Ingester, ingest_paths
from daemon.ingest.watcher import InboxWatcher

__all__ = ["InboxWatcher", "Ingester", "Outcome", "ingest_paths"]
