"""The optional compiled fast path (everything else about the build is in pyproject.toml).

``shmcache/shm/_fast.c`` is built when a C compiler and Python's headers are there; if the
build fails (no compiler, another platform), setuptools says so and the install goes on:
shmcache then runs its pure-Python code, which is the reference and the fallback
(README "Performance": "Two implementations").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmcache.shm._fast",
            ["shmcache/shm/_fast.c"],
            optional=True,  # no compiler: a warning, and pure Python
            extra_compile_args=["-std=gnu11", "-pthread", "-Wall"],
            extra_link_args=["-pthread"],
        )
    ]
)
