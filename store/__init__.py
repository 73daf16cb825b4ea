"""The SQLite store: the single source of truth for documents, stages and adapters.

Use :func:`store.db.open_db` to get a connection (one per process or thread) and the
functions in :mod:`store.documents`, :mod:`store.stages`, :mod:`store.adapters` and
:mod:`store.events` to read and write it.
"""

from store.db import open_db, savepoint, transaction

__all__ = ["open_db", "savepoint", "transaction"]
