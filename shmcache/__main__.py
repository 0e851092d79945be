"""``python -m shmcache``: the same as the ``shmcache`` command."""

import sys

from .cli.main import main

sys.exit(main())
