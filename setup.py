"""Build of fused_pool and its optional C++/CUDA extension ``fused_pool._C``.

The extension is compiled from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` (plus ``csrc/cuda/*.cu`` when
torch has CUDA and ``nvcc`` is found) through ``torch.utils.cpp_extension`` with ninja. It is
optional: with no sources, or when the compiler fails, the pure-Python package still installs and
``fused_pool.backend_status()`` says why the ``"cpp"`` backend is unavailable.

Environment: ``FUSED_POOL_NO_EXT=1`` skips the extension; ``FUSED_POOL_REQUIRE_EXT=1`` makes a
failed build an error (CI uses it so a broken kernel cannot hide); ``FUSED_POOL_CPU_FLAGS``
replaces the default ``-march=native`` (see below).
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("FUSED_POOL_NO_EXT") == "1":
        return [], {}
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if os.environ.get("FUSED_POOL_REQUIRE_EXT") == "1":
                    raise
                print(f"WARNING: fused_pool._C was not built ({exc}); the 'cpp' backend will be "
                      "unavailable", file=sys.stderr)

    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp the
    # kernels would run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # The extension is built from source on the machine that runs it (pip install -e .), so by
    # default it targets that CPU's vector units (AVX2/AVX-512 double the width of the pooling
    # loops over SSE2). FUSED_POOL_CPU_FLAGS="" (or e.g. "-march=x86-64-v2") gives a portable
    # build for another machine.
    arch = os.environ.get("FUSED_POOL_CPU_FLAGS", "-march=native").split()
    ext = CppExtension(
        "fused_pool._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # -ffp-contract=off: no silent a*b+c fusion, so a value computed twice (once inside a
        # reduction, once elementwise) rounds the same way both times.
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-ffp-contract=off", *arch, *openmp]},
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
