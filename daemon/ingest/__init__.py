"""Exactly-once ingestion of inbox files into the store.

One job per module, in the order a file meets them:

- ``discover``: which names are candidate documents, and how a path is keyed;
- ``reading``: open a file once and judge the descriptor (no inbox escapes);
- ``parsers`` / ``clean`` / ``chunking``: bytes to text or chat examples, normalised and
  filtered, cut lazily into token windows with a train/holdout split (``htmltext``:
  HTML at any nesting depth);
- ``prepare``: all of the above for one file, without writing;
- ``commit``: what a prepared file means for the store (new, duplicate, new version,
  quarantined), a batch per transaction and a savepoint per file;
- ``pipeline``: the :class:`Ingester` that batches prepare + commit, and ``evergreen
  ingest``; ``outcome``: the outcome words and summaries they share;
- ``dirs``: the state and inbox directories checked at start (one-line errors);
- ``watcher`` (events and the worker), ``stability`` (when a file is done being
  written) and ``scan`` (rescans, renames and removals against the store).

Bad input never raises out of here: it becomes a quarantined document with a reason.
"""

from daemon.ingest.dirs import DirectoryError, ensure_dirs
from daemon.ingest.outcome import Outcome
from daemon.ingest.pipeline import Ingester, ingest_paths
from daemon.ingest.watcher import InboxWatcher

__all__ = ["DirectoryError", "InboxWatcher", "Ingester", "Outcome", "ensure_dirs", "ingest_paths"]
