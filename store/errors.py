"""The one base class for failures a user can act on.

It lives in ``store``, the bottom layer, so that every layer (store, policies, daemon)
derives its errors from the same class without importing upwards. The CLI prints these
as one line and exits 1 (a traceback only with ``--debug``); the daemon logs them with
their message and keeps running where it can. Anything else that escapes is a bug and
keeps its traceback.
"""


class EvergreenError(Exception):
    """An expected failure with a message that says what to do."""
