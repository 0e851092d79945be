"""The optional compiled fast path (everything else about the build is in pyproject.toml).

``shmcache/shm/_fast.c`` is built when a C compiler and Python's headers are there; if the
build fails (no compiler, another platform), setuptools says so and the install goes on:
shmcache then runs its pure-Python code, which is the reference and the fallback
(README "Performance": "Two implementations").
"""

import os
import sysconfig

from setuptools import Extension, setup


def _xxhash_header() -> list[str]:
    """The directory of xxHash's own header if this machine has it (Debian/Ubuntu:
    ``libxxhash-dev``; or ``SHMCACHE_XXHASH_INCLUDE=DIR``): the core then computes xxh3
    inline, about 600 instructions less per hash than calling the xxhash module. Without
    it the core calls the module: the same hashes, a little slower."""
    places = [os.environ.get("SHMCACHE_XXHASH_INCLUDE", ""), sysconfig.get_paths()["include"],
              "/usr/local/include", "/usr/include"]
    return [d for d in places if d and os.path.isfile(os.path.join(d, "xxhash.h"))][:1]


_XXH = _xxhash_header()

setup(
    ext_modules=[
        Extension(
            "shmcache.shm._fast",
            ["shmcache/shm/_fast.c"],
            optional=True,  # no compiler: a warning, and pure Python
            include_dirs=_XXH,
            define_macros=[("SHMCACHE_XXHASH_INLINE", "1")] if _XXH else [],
            extra_compile_args=["-std=gnu11", "-pthread", "-Wall"],
            extra_link_args=["-pthread"],
        )
    ]
)
