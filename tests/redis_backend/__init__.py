"""A package, so that this directory's conftest is ``redis_backend.conftest`` and does not
shadow ``tests/conftest.py``, which other tests import by the name ``conftest``."""
