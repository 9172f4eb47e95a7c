"""Build of fused_pool and its optional C++/CUDA extension ``fused_pool._C``.

The extension is compiled from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` (plus ``csrc/cuda/*.cu`` when
torch has CUDA and ``nvcc`` is found) through ``torch.utils.cpp_extension`` with ninja. It is
optional: with no sources, or when the compiler fails, the pure-Python package still installs and
``fused_pool.backend_status()`` says why the ``"cpp"`` backend is unavailable.

Environment: ``FUSED_POOL_NO_EXT=1`` skips the extension; ``FUSED_POOL_REQUIRE_EXT=1`` makes a
failed build an error (CI uses it so a broken kernel cannot hide); ``FUSED_POOL_CPU_FLAGS``
replaces the default ``-march=native`` (see below).

CUDA: the kernels in ``csrc/cuda/*.cu`` are compiled (``CUDAExtension``) when torch was built
with CUDA (``torch.version.cuda``) and ``nvcc`` is found (torch's ``CUDA_HOME``: the
``CUDA_HOME`` variable, else the ``nvcc`` on ``PATH``); no GPU is needed to build.
``FUSED_POOL_CUDA=1`` requires them (an error says what is missing), ``FUSED_POOL_CUDA=0`` builds
the CPU kernels only. ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``, ``"8.0;9.0+PTX"``) chooses the
GPU architectures; unset, torch's default applies (the visible GPUs' architectures), and with no
GPU visible the architectures torch itself was built for. Without CUDA the build is exactly the
CPU-only one.
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

    cuda_sources = _cuda_sources()

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                required = ("FUSED_POOL_REQUIRE_EXT", "FUSED_POOL_CUDA")
                if any(os.environ.get(v) == "1" for v in required):
                    raise
                error = exc
            if any(src.endswith(".cu") for src in ext.sources):
                # Keep the CPU kernels when only the CUDA ones fail (e.g. an nvcc too old).
                print(f"WARNING: the CUDA kernels of fused_pool._C were not built ({error}); "
                      "building its CPU kernels only", file=sys.stderr)
                ext.sources = [src for src in ext.sources if not src.endswith(".cu")]
                try:
                    super().build_extension(ext)
                    return
                except Exception as exc:  # noqa: BLE001
                    error = exc
            print(f"WARNING: fused_pool._C was not built ({error}); the 'cpp' backend will be "
                  "unavailable", file=sys.stderr)

    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp the
    # kernels would run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # The extension is built from source on the machine that runs it (pip install -e .), so by
    # default it targets that CPU's vector units (AVX2/AVX-512 double the width of the pooling
    # loops over SSE2). FUSED_POOL_CPU_FLAGS="" (or e.g. "-march=x86-64-v2") gives a portable
    # build for another machine.
    arch = os.environ.get("FUSED_POOL_CPU_FLAGS", "-march=native").split()
    # -ffp-contract=off: no silent a*b+c fusion, so a value computed twice (once inside a
    # reduction, once elementwise) rounds the same way both times.
    cxx = ["-O3", _cxx_std(), "-ffp-contract=off", *arch, *openmp]
    if not cuda_sources:
        ext = CppExtension(
            "fused_pool._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    else:
        from torch.utils.cpp_extension import CUDAExtension

        _default_cuda_arch_list()
        # Plain -O3, no --use_fast_math: fast math flushes denormals and uses approximate exp/log
        # and division, which would break NaN/Inf propagation and the attention softmax's
        # accuracy. -lineinfo maps profiler samples to source lines at no runtime cost. The C++
        # standard is left to torch (it must match what its headers require).
        nvcc = ["-O3", "-lineinfo"]
        # The torch wheel ships headers its CUDA headers include (cusparse.h, ...) under
        # site-packages/nvidia/*/include. -isystem puts them after nvcc's own toolkit headers.
        for inc in _nvidia_wheel_includes():
            nvcc += ["-isystem", inc]
        ext = CUDAExtension(
            "fused_pool._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("FUSED_POOL_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


def _cxx_std():
    """C++17, or C++20 where torch's headers require it (torch >= 2.14 refuses C++17)."""
    import torch

    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            needs_20 = "C++20 or later" in f.read()
    except OSError:
        needs_20 = False
    return "-std=c++20" if needs_20 else "-std=c++17"


def _cuda_sources():
    """csrc/cuda/*.cu when they should be built (see FUSED_POOL_CUDA above), else []."""
    mode = os.environ.get("FUSED_POOL_CUDA", "")
    if mode == "0":
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    sources = _sources("csrc/cuda/*.cu")
    missing = []
    if not sources:
        missing.append("there are no csrc/cuda/*.cu sources")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} was built without CUDA")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if missing:
        if mode == "1":
            raise RuntimeError("FUSED_POOL_CUDA=1 but " + "; ".join(missing))
        return []
    return sources


def _default_cuda_arch_list():
    """Without TORCH_CUDA_ARCH_LIST and with no GPU visible, torch's default has no architecture
    to compile for: use the ones torch itself was built for (what it would run on)."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return
    archs = [a[3:] for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()]
    if archs:
        arch_list = [f"{a[:-1]}.{a[-1]}" for a in archs]
        arch_list[-1] += "+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = value = ";".join(arch_list)
        print(f"fused_pool: no GPU visible, TORCH_CUDA_ARCH_LIST={value}", file=sys.stderr)


def _nvidia_wheel_includes():
    """site-packages/nvidia/*/include directories of the CUDA torch wheel's dependencies."""
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
