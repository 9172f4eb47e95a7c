"""Build of fused_pool and its optional C++/CUDA extension ``fused_pool._C``.

Two kinds of build, decided by whether torch can be imported here:

* torch importable (``pip install --no-build-isolation [-e] .``, as ``scripts/setup.sh`` does):
  ``fused_pool._C`` is compiled from ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` (plus
  ``csrc/cuda/*.cu`` when torch has CUDA and ``nvcc`` is found) through
  ``torch.utils.cpp_extension`` with ninja, for that torch.
* torch not importable (plain ``pip install .`` or ``python -m build``: pip's isolated build
  environment, and pyproject.toml asks for no torch there, since it would not be the user's):
  a pure-Python package. The wheel carries ``csrc/`` as ``fused_pool/_csrc/``, and the kernels
  are compiled for the user's torch on first use or by ``python -m fused_pool build``
  (``fused_pool/_extension.py``).

Sources, compiler flags and the CUDA decision are written once, in ``fused_pool/_extension.py``
(loaded here by path), and shared with that first-use build.

The extension is optional: with no sources, or when the compiler fails, the pure-Python package
still installs (and then builds on first use). Environment: ``FUSED_POOL_NO_EXT=1`` skips the
extension; ``FUSED_POOL_REQUIRE_EXT=1`` makes a failed build an error (CI uses it so a broken
kernel cannot hide); ``FUSED_POOL_CPU_FLAGS`` replaces the default ``-march=native``.

CUDA: the kernels in ``csrc/cuda/*.cu`` are compiled (``CUDAExtension``) when torch was built
with CUDA (``torch.version.cuda``) and ``nvcc`` is found (the ``CUDA_HOME`` variable, else the
toolkit of the ``nvcc`` on ``PATH``, also when that nvcc is a wrapper script); no GPU is needed to
build. ``FUSED_POOL_CUDA=1`` requires them (an error says what is missing), ``FUSED_POOL_CUDA=0``
builds the CPU kernels only. ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``, ``"8.0;9.0+PTX"``) chooses
the GPU architectures; unset, torch's default applies (the visible GPUs' architectures), and with
no GPU visible the architectures torch itself was built for. Without CUDA the build is exactly the
CPU-only one.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_extension_helpers():
    """fused_pool/_extension.py, by path: the flags live there, shared with the first-use build,
    and importing the fused_pool package here would need torch."""
    path = os.path.join(ROOT, "fused_pool", "_extension.py")
    spec = importlib.util.spec_from_file_location("_fused_pool_extension_setup", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_ext = _load_extension_helpers()


class BuildPyWithSources(build_py):
    """Puts csrc/ into the wheel as fused_pool/_csrc/: the sources of the first-use build, for an
    install whose build had no torch (or whose fused_pool._C does not load)."""

    def run(self):
        super().run()
        if not self.distribution.ext_modules:  # a _C left in build/lib by an earlier build
            for stale in glob.glob(os.path.join(self.build_lib, "fused_pool", "_C.*")):
                os.remove(stale)
        csrc = os.path.join(ROOT, "csrc")
        if getattr(self, "editable_mode", False) or not os.path.isdir(csrc):
            return  # an editable install finds csrc/ beside the package
        target = os.path.join(self.build_lib, "fused_pool", "_csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(csrc, target, ignore=shutil.ignore_patterns("*.o", "*.so"))


def _torch_missing():
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _extensions():
    if os.environ.get("FUSED_POOL_NO_EXT") == "1":
        return []
    csrc = os.path.join(ROOT, "csrc")
    if not _ext.cpp_sources(csrc):
        return []
    why = _torch_missing()
    if why is not None:
        # pip's default isolated build environment has no torch (pyproject.toml does not ask for
        # one: it would be another torch than the user's). The C++ kernels are then built for the
        # user's torch on first use (fused_pool/_extension.py).
        print(f"fused_pool: torch is not importable here ({why}): building a pure-Python "
              "package; its C++ kernels are compiled for the installed torch on first use, or by "
              "`python -m fused_pool build`", file=sys.stderr)
        return []
    cuda_sources, missing = _ext.cuda_sources(csrc)  # resolves CUDA_HOME behind an nvcc wrapper
    if missing and os.environ.get("FUSED_POOL_CUDA") == "1":
        raise RuntimeError("FUSED_POOL_CUDA=1 but " + "; ".join(missing))
    if cuda_sources:
        _ext.default_cuda_arch_list()
    options = _ext.extension_options(csrc, cuda_sources)
    options["sources"] = [os.path.relpath(p, ROOT) for p in options["sources"]]
    _ext.ensure_ninja_on_path()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    kind = CUDAExtension if cuda_sources else CppExtension
    return [kind("fused_pool._C", **options)]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

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
            print(f"WARNING: fused_pool._C was not built ({error}); the 'cpp' backend will "
                  "build its kernels on first use instead", file=sys.stderr)

    return OptionalBuildExtension.with_options(use_ninja=True)


ext_modules = _extensions()
cmdclass = {"build_py": BuildPyWithSources}
if ext_modules:
    cmdclass["build_ext"] = _build_ext()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
