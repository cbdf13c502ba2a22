"""Build of the engine's SIMD kernels (deepshrink/engine/_simd.c); everything else is in pyproject.toml.

The extension is optional: where no C compiler is found the install still succeeds and the
engine runs its numba kernels. OpenMP is used where the compiler has it (threads), else
the kernels run on one thread. No -march flag: the AVX-512 kernels carry their own target
attributes and are chosen at run time from the CPU.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildWithOpenMP(build_ext):
    """Compile with OpenMP if the compiler takes it, else without."""

    def build_extension(self, ext: Extension) -> None:
        msvc = self.compiler.compiler_type == "msvc"
        attempts = [["/O2", "/openmp"], ["/O2"]] if msvc else [["-O3", "-fopenmp"], ["-O3"]]
        for flags in attempts:
            ext.extra_compile_args = flags
            ext.extra_link_args = [f for f in flags if "openmp" in f]
            try:
                super().build_extension(ext)
                return
            except Exception as err:  # noqa: BLE001 (distutils' errors vary by compiler; the last attempt re-raises)
                if flags is attempts[-1]:
                    raise
                print(f"building {ext.name} with {flags[-1]} failed ({err}); trying without it")


setup(
    ext_modules=[Extension("deepshrink.engine._simd", ["src/deepshrink/engine/_simd.c"], optional=True)],
    cmdclass={"build_ext": BuildWithOpenMP},
)
