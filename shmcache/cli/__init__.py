"""The ``shmcache`` command (``main``) and its live demo (``demo``, ``demo_app``).

An integration: it imports the backends; nothing in the backends imports it.
"""
