"""Scheduling: the glue between the store, the policies and the workers.

``decisions`` snapshots the store and explains the trigger policy's verdict, ``planning``
plans a stage, gates a candidate and handles rejected data, ``probes`` measures vLLM load
and free memory for the trigger leaves that need them, ``schedule`` runs the tick on an
APScheduler interval, and ``spec`` builds the configured policies. The policies
themselves (``policies/``) stay pure and import nothing of the daemon.
"""
