"""The shmcache benchmark suite: ``python -m bench`` from the repository root.

Every performance figure in the README comes from here. Each section lives in its own
module and returns plain dicts, so the whole run is one JSON document:

* ``single``  ns per call (median, p99) of get-hit, get-miss, set, invalidate, every backend
* ``multi``   aggregate throughput and tail latency with 1, 2, 4, 8 processes on one store
* ``table``   get/set cost against load factor, and under sustained set/invalidate churn
* ``e2e``     gunicorn (4 workers) requests per second, driven by wrk or a Python client
* ``memory``  shared memory per session, and time to create/attach a 1,000,000-session segment

``targets`` judges the issue's targets against the figures; ``report``, ``plots`` and
``readme`` turn the JSON into the terminal table, the PNGs and the README section.
"""
