"""Build of the engine's SIMD kernels (deepshrink/engine/_simd.c); everything else is in pyproject.toml.

The extension is optional: where no C compiler is found the install still succeeds and the
engine runs its numba kernels. No -march flag: the AVX-512 kernels carry their own target
attributes and are chosen at run time from the CPU. Threads: OpenMP where the compiler has
it (-fopenmp links the runtime torch's CPU ops run on, so both share one team of threads and
never fight for the cores), else POSIX threads.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, LinkError

OPENMP = ["-fopenmp"]


class BuildWithOpenMP(build_ext):
    """Builds with OpenMP, and again without it where the compiler refuses it (Apple's clang)."""

    def build_extension(self, ext: Extension) -> None:
        if sys.platform == "win32":
            return super().build_extension(ext)
        plain = (list(ext.extra_compile_args), list(ext.extra_link_args))
        ext.extra_compile_args, ext.extra_link_args = plain[0] + OPENMP, plain[1] + OPENMP
        try:
            return super().build_extension(ext)
        except (CompileError, LinkError):
            ext.extra_compile_args, ext.extra_link_args = plain
            return super().build_extension(ext)


flags = [] if sys.platform == "win32" else ["-O3", "-pthread", "-ffp-contract=off"]
setup(
    cmdclass={"build_ext": BuildWithOpenMP},
    ext_modules=[
        Extension(
            "deepshrink.engine._simd",
            ["src/deepshrink/engine/_simd.c"],
            extra_compile_args=flags,
            extra_link_args=flags[1:],
            optional=True,
        )
    ],
)
