"""Build of the engine's SIMD kernels (deepshrink/engine/_simd.c); everything else is in pyproject.toml.

The extension is optional: where no C compiler is found the install still succeeds and the
engine runs its numba kernels. No -march flag: the AVX-512 kernels carry their own target
attributes and are chosen at run time from the CPU. Threads are POSIX threads.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-pthread"]
setup(
    ext_modules=[
        Extension(
            "deepshrink.engine._simd",
            ["src/deepshrink/engine/_simd.c"],
            extra_compile_args=flags,
            extra_link_args=flags[1:],
            optional=True,
        )
    ]
)
