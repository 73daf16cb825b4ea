"""``python -m daemon`` is the ``evergreen`` CLI."""

from daemon.cli import main

if __name__ == "__main__":
    main()
