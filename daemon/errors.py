"""Re-export of :class:`store.errors.EvergreenError`, the one base for expected failures.

Kept so ``from daemon.errors import EvergreenError`` reads naturally in daemon code; the
class itself lives in the bottom layer (``store``) so policies and the store share it.
"""

from store.errors import EvergreenError

__all__ = ["EvergreenError"]
