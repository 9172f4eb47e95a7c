"""Where the "cpp" backend's compiled kernels come from, and how they are built.

Two ways, tried in this order by ``load()`` (called by ``_dispatch._probe_cpp`` on import):

1. ``fused_pool._C``, compiled by ``setup.py`` when torch was importable at build time: the
   contributors' ``pip install --no-build-isolation -e .`` (``scripts/setup.sh``).
2. Otherwise (plain ``pip install .``: pip builds in an isolated environment without torch, so
   the wheel is pure Python and carries ``csrc/`` as ``fused_pool/_csrc/``), a build of the same
   sources for the torch in use, made with ``torch.utils.cpp_extension.load`` (ninja) in a cache
   folder named after the torch version, CUDA, C++ ABI, Python, flags and a hash of the sources.
   It is made on the first import that finds none (a message on stderr says so; a file lock
   keeps two processes from building at once, the second waits and loads the first's) or ahead
   of time by ``python -m fused_pool build`` (for images). A failed build is recorded there with
   its log, so later imports report it at once instead of compiling again; ``python -m
   fused_pool build`` retries.

Environment: ``FUSED_POOL_CACHE_DIR`` (the cache folder; default ``$XDG_CACHE_HOME/fused_pool``,
else ``~/.cache/fused_pool``); ``FUSED_POOL_JIT=0`` never builds on import (``python -m
fused_pool build`` still does); ``FUSED_POOL_CPU_FLAGS``, ``FUSED_POOL_CUDA``,
``TORCH_CUDA_ARCH_LIST``, ``MAX_JOBS``, ``CXX`` and ``CUDA_HOME`` as for ``setup.py``.

``setup.py`` loads this file by path (it never imports the fused_pool package, and this module
imports torch only inside functions): ``extension_options`` is the one place the compiler flags
are written, ``cuda_sources`` the one place that decides whether the CUDA kernels are built.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

PKG_DIR = os.path.dirname(os.path.abspath(__file__))
LIB_NAME = "fused_pool_cpp"  # the shared library a first-use build makes (not a Python module)
OK_FILE = "build.json"
FAILED_FILE = "failed.json"
LOG_FILE = "build.log"

# What load() found, for `python -m fused_pool info`: origin ("prebuilt", "cache", "built" or
# None), path (the loaded library, or the cache folder it would be in), notes (why some kernels
# are not in use).
STATE: dict = {"origin": None, "path": None, "notes": [], "seconds": None}


def _say(message: str) -> None:
    print(f"fused_pool: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Sources and flags (shared with setup.py)
# ----------------------------------------------------------------------------------------------


def glob_sources(csrc: str, pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.join(csrc, pattern)))


def cpp_sources(csrc: str) -> list[str]:
    return glob_sources(csrc, "*.cpp") + glob_sources(csrc, os.path.join("cpu", "*.cpp"))


def source_dir() -> str | None:
    """The C++ sources: ``fused_pool/_csrc`` in an installed wheel, ``csrc/`` beside the package
    in a checkout (editable install)."""
    for d in (os.path.join(PKG_DIR, "_csrc"), os.path.join(os.path.dirname(PKG_DIR), "csrc")):
        if cpp_sources(d):
            return d
    return None


def cxx_std() -> str:
    """C++17, or C++20 where torch's headers require it (torch >= 2.14 refuses C++17)."""
    import torch

    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            needs_20 = "C++20 or later" in f.read()
    except OSError:
        needs_20 = False
    return "-std=c++20" if needs_20 else "-std=c++17"


def cpu_arch_flags() -> list[str]:
    # The kernels are built on the machine that runs them (pip install -e ., or the first-use
    # build), so by default they target that CPU's vector units (AVX2/AVX-512 double the width of
    # the pooling loops over SSE2). FUSED_POOL_CPU_FLAGS="" (or e.g. "-march=x86-64-v2") gives a
    # portable build for another machine.
    return os.environ.get("FUSED_POOL_CPU_FLAGS", "-march=native").split()


def nvidia_wheel_includes() -> list[str]:
    """site-packages/nvidia/*/include directories of the CUDA torch wheel's dependencies."""
    import torch

    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def extension_options(csrc: str, cuda_srcs: list[str]) -> dict:
    """Sources and flags of the extension, as keyword arguments of CppExtension/CUDAExtension
    (sources are absolute paths). ``cuda_srcs`` (from ``cuda_sources``) empty: CPU kernels only."""
    # at::parallel_for is an inline OpenMP loop in torch's headers: without -fopenmp the kernels
    # would run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    # -ffp-contract=off: no silent a*b+c fusion, so a value computed twice (once inside a
    # reduction, once elementwise) rounds the same way both times.
    cxx = ["-O3", cxx_std(), "-ffp-contract=off", *cpu_arch_flags(), *openmp]
    options = {
        "sources": cpp_sources(csrc) + list(cuda_srcs),
        "include_dirs": [csrc],
        "define_macros": [],
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": openmp,
    }
    if cuda_srcs:
        # Plain -O3, no --use_fast_math: fast math flushes denormals and uses approximate exp/log
        # and division, which would break NaN/Inf propagation and the attention softmax's
        # accuracy. -lineinfo maps profiler samples to source lines at no runtime cost. The C++
        # standard is left to torch (it must match what its headers require).
        nvcc = ["-O3", "-lineinfo"]
        # The torch wheel ships headers its CUDA headers include (cusparse.h, ...) under
        # site-packages/nvidia/*/include. -isystem puts them after nvcc's own toolkit headers.
        for inc in nvidia_wheel_includes():
            nvcc += ["-isystem", inc]
        options["define_macros"] = [("FUSED_POOL_WITH_CUDA", "1")]
        options["extra_compile_args"]["nvcc"] = nvcc
    return options


def _is_cuda_home(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home() -> str | None:
    """``CUDA_HOME`` (or ``CUDA_PATH``), else the toolkit of the ``nvcc`` on ``PATH``.

    torch guesses the grandparent folder of that nvcc, which is wrong when it is a wrapper script
    (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``: torch's guess
    ``/usr/local`` has no ``lib64/libcudart``, and linking fails). So: follow symlinks, and when
    that folder is no toolkit, ask nvcc where its toolkit is (the ``TOP`` of ``nvcc --dryrun``,
    as scripts/ci_cuda_build.sh does)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_cuda_home(home):
        return home
    try:
        r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True, timeout=60)
        found = re.findall(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        found = []
    top = os.path.realpath(found[0].strip()) if found else None
    if top and os.path.isdir(top):
        return top
    return os.path.dirname(os.path.dirname(nvcc))  # torch's own guess


def use_cuda_home() -> str | None:
    """Resolve the CUDA home (``find_cuda_home``) and hand it to torch.utils.cpp_extension (the
    variable for a later import, the module attribute if it is imported already)."""
    home = find_cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
        module = sys.modules.get("torch.utils.cpp_extension")
        if module is not None:
            module.CUDA_HOME = home
    return home


def cuda_sources(csrc: str) -> tuple[list[str], list[str]]:
    """(csrc/cuda/*.cu, []) when the CUDA kernels should be built, else ([], the reasons why
    not). ``FUSED_POOL_CUDA=0`` never builds them; the caller decides what ``=1`` does."""
    if os.environ.get("FUSED_POOL_CUDA", "") == "0":
        return [], ["FUSED_POOL_CUDA=0"]
    import torch

    sources = glob_sources(csrc, os.path.join("cuda", "*.cu"))
    missing = []
    if not sources:
        missing.append("there are no csrc/cuda/*.cu sources")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} was built without CUDA")
    else:
        home = use_cuda_home()
        nvcc = os.path.join(home, "bin", "nvcc") if home else None
        if nvcc is None or not os.path.exists(nvcc):
            missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return ([] if missing else sources), missing


def default_cuda_arch_list() -> None:
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
        _say(f"no GPU visible, TORCH_CUDA_ARCH_LIST={value}")


def ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja wheel's binary is not on it when the venv is not
    activated (``/path/venv/bin/python ...``)."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(Exception):
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    for d in dirs:
        if os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


# ----------------------------------------------------------------------------------------------
# The first-use build: cache folder, lock, diagnosis
# ----------------------------------------------------------------------------------------------


def cache_root() -> str:
    if os.environ.get("FUSED_POOL_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(os.environ["FUSED_POOL_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "fused_pool")


def _cpu_fingerprint() -> str:
    """What -march=native compiles for: a cache shared between machines (an NFS home) must not
    hand one CPU's build to another."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def sources_hash(csrc: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(csrc):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith(".md"):
                continue
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, csrc).replace(os.sep, "/").encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def build_dir(csrc: str, options: dict, cuda: bool) -> str:
    """The cache folder of one build: everything the .so depends on is in its name."""
    import torch

    flags = {k: options[k] for k in ("define_macros", "extra_compile_args", "extra_link_args")}
    flags["compiler"] = os.environ.get("CXX", "c++")
    if cuda:
        flags["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if "-march=native" in options["extra_compile_args"]["cxx"]:
        flags["cpu"] = _cpu_fingerprint()
    h = hashlib.sha256(sources_hash(csrc).encode())
    # Paths differ between installs of the same torch (venvs): the nvidia include folders hash by
    # name only.
    h.update(re.sub(r"\S*/site-packages/", "", json.dumps(flags, sort_keys=True)).encode())
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 0))
    variant = f"cu{torch.version.cuda}" if cuda else "cpu"
    tag = (f"torch{torch.__version__}-{variant}-cxx11abi{abi}-{sys.implementation.cache_tag}-"
           f"{platform.machine()}-{h.hexdigest()[:12]}")
    return os.path.join(cache_root(), re.sub(r"[^A-Za-z0-9._-]", "_", tag))


@contextlib.contextmanager
def build_lock(path: str):
    """An exclusive lock on ``path`` (fcntl.flock: released by the OS if the holder dies, unlike
    torch's own lock file, which a killed build leaves behind for every later one to wait on)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another process is building the C++ kernels (it holds {path}); waiting for "
                 "it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CAUSES = [
    (r"Ninja is required",
     "ninja was not found", "`pip install ninja`"),
    (r"Python\.h: No such file",
     "the Python headers (Python.h) are missing",
     "install them (e.g. `apt-get install python3-dev`)"),
    (r"cannot find -lcudart|cannot find -lcuda\b|cuda_runtime(_api)?\.h: No such file|"
     r"nvcc: (command )?not found|No such file or directory: '\S*nvcc'",
     "the CUDA toolkit is not where CUDA_HOME={cuda_home} points",
     "set CUDA_HOME to the CUDA toolkit (the folder with bin/nvcc, include/ and lib64/), or "
     "FUSED_POOL_CUDA=0 for the CPU kernels only"),
    (r"unsupported GNU version|unsupported (host )?compiler",
     "nvcc does not support this host compiler",
     "point CXX/CC (and NVCC_CCBIN) to a compiler this CUDA supports, or FUSED_POOL_CUDA=0"),
    (r"(?:c\+\+|g\+\+|gcc|cc|clang\+\+|clang): (?:command )?not found|"
     r"No such file or directory: '(?:c\+\+|g\+\+|gcc|cc|clang\+\+)'",
     "no C++ compiler was found",
     "install one (e.g. `apt-get install g++`) or set CXX"),
    (r"fatal error: ([^:\s]+): No such file",
     "a header is missing: {0}",
     "install the package that provides it (torch's own headers come with torch: reinstall "
     "torch if they are the missing ones)"),
    (r"unrecognized command[- ]line option|unrecognized argument",
     "the compiler rejects a flag",
     "set FUSED_POOL_CPU_FLAGS (e.g. to \"\") or use a newer compiler"),
    (r"error:|Error building extension|error while loading|undefined symbol",
     "the compiler or linker failed",
     "see the log; please report it with the output of `python -m fused_pool info`"),
]


def diagnose(log: str, cuda_home: str | None = None) -> tuple[str, str]:
    """(cause, fix) of a failed build, from its output."""
    for pattern, cause, fix in _CAUSES:
        m = re.search(pattern, log)
        if m:
            groups = [g for g in m.groups() if g] or [""]
            return cause.format(groups[0], cuda_home=cuda_home or "(unset)"), fix
    return "the build failed", "see the log"


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.split() else "c++") is None:
        return (f"no C++ compiler was found ({cxx!r} is not on PATH): install one (e.g. "
                "`apt-get install g++`) or set CXX, then import fused_pool again or run "
                "`python -m fused_pool build`")
    return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _registered() -> bool:
    """Whether the fused_pool_cpp operators are registered in this process already."""
    import torch

    from ._schema import SCHEMAS

    return hasattr(torch.ops.fused_pool_cpp, next(iter(SCHEMAS)))


def _load_library(path: str) -> None:
    import torch

    torch.ops.load_library(path)


def _build(csrc: str, cuda_srcs: list[str], allow_build: bool, retry_failed: bool,
           verbose: bool) -> tuple[bool, str]:
    """Load the cached build of (csrc, cuda_srcs) for this torch, building it if needed.
    (True, library path) or (False, why not)."""
    import torch

    cuda = bool(cuda_srcs)
    if cuda:
        default_cuda_arch_list()
    options = extension_options(csrc, cuda_srcs)
    where = build_dir(csrc, options, cuda)
    library = os.path.join(where, LIB_NAME + (".pyd" if sys.platform == "win32" else ".so"))
    what = "C++/CUDA" if cuda else "C++"
    torch_desc = f"torch {torch.__version__}"

    def cached() -> bool:
        return os.path.isfile(library) and _read_json(os.path.join(where, OK_FILE)) is not None

    def failed_before() -> str | None:
        failed = _read_json(os.path.join(where, FAILED_FILE))
        if failed is None:
            return None
        return (f"building the {what} kernels for {torch_desc} failed: {failed.get('cause')}; "
                f"fix: {failed.get('fix')}; then run `python -m fused_pool build` to retry "
                f"(log: {os.path.join(where, LOG_FILE)})")

    STATE["path"] = where
    if cached():
        try:
            _load_library(library)
            return True, library
        except OSError as exc:  # e.g. a library it links to changed: build it again
            STATE["notes"].append(f"the cached build did not load ({exc}); building it again")
            os.remove(os.path.join(where, OK_FILE))
    if not retry_failed and (why := failed_before()):
        return False, why
    if not allow_build:
        return False, (f"the {what} kernels are not built for {torch_desc} yet: run "
                       "`python -m fused_pool build` (or import fused_pool without "
                       "FUSED_POOL_JIT=0 to build them on first use)")
    if why := _compiler_missing():
        return False, why
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as exc:
        return False, (f"cannot create the build folder {where} ({exc}): set "
                       "FUSED_POOL_CACHE_DIR to a writable folder")
    with build_lock(where + ".lock"):
        if cached():  # another process built it while this one waited
            _load_library(library)
            return True, library
        if not retry_failed and (why := failed_before()):
            return False, why
        for stale in ("lock", FAILED_FILE):  # torch's lock file, left by a killed build
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(where, stale))
        jobs = os.environ.get("MAX_JOBS") or f"{os.cpu_count()} cores"
        _say(f"compiling the {what} kernels for {torch_desc} ({len(options['sources'])} files, "
             f"MAX_JOBS={jobs}), once for this torch; this takes a minute or more. Into {where}")
        ensure_ninja_on_path()
        start = time.monotonic()
        try:
            from torch.utils import cpp_extension

            defines = [f"-D{k}={v}" for k, v in options["define_macros"]]
            cpp_extension.load(
                name=LIB_NAME,
                sources=options["sources"],
                extra_cflags=options["extra_compile_args"]["cxx"] + defines,
                extra_cuda_cflags=options["extra_compile_args"].get("nvcc", []) + defines,
                extra_ldflags=options["extra_link_args"],
                extra_include_paths=options["include_dirs"],
                build_directory=where,
                verbose=verbose,
                with_cuda=cuda,
                is_python_module=False,
            )
        except Exception as exc:  # noqa: BLE001 - any compiler, linker or loader failure
            log = f"{type(exc).__name__}: {exc}"
            with open(os.path.join(where, LOG_FILE), "w") as f:
                f.write(log)
            cuda_home = os.environ.get("CUDA_HOME") if cuda else None
            cause, fix = diagnose(log, cuda_home)
            with open(os.path.join(where, FAILED_FILE), "w") as f:
                json.dump({"cause": cause, "fix": fix, "torch": torch.__version__,
                           "time": time.time()}, f)
            tail = "\n".join(log.strip().splitlines()[-15:])
            _say(f"building the {what} kernels FAILED after {time.monotonic() - start:.0f} s: "
                 f"{cause}. Fix: {fix}. Last lines of the log "
                 f"({os.path.join(where, LOG_FILE)}):\n{tail}")
            return False, failed_before() or cause
        seconds = time.monotonic() - start
        with open(os.path.join(where, OK_FILE), "w") as f:
            json.dump({"torch": torch.__version__, "cuda": cuda, "seconds": round(seconds, 1),
                       "sources": [os.path.relpath(s, csrc) for s in options["sources"]],
                       "flags": options["extra_compile_args"]}, f, indent=1)
        STATE["seconds"] = seconds
        _say(f"the {what} kernels were built in {seconds:.0f} s (cached for later runs)")
        return True, library


def load(allow_build: bool | None = None, retry_failed: bool = False,
         verbose: bool = False) -> tuple[bool, str]:
    """Make the fused_pool_cpp operators available in this process: ``fused_pool._C`` if it was
    built at install, else the cached first-use build (built now unless ``allow_build`` is
    False; default: unless ``FUSED_POOL_JIT=0``). (True, where they come from) or (False, why
    not, with the fix)."""
    if _registered():  # loading a second copy would abort the process (TORCH_LIBRARY twice)
        return True, f"loaded already ({STATE['path']})"
    notes = STATE["notes"] = []
    try:
        module = importlib.import_module("fused_pool._C")
    except ImportError as exc:
        if not (isinstance(exc, ModuleNotFoundError) and exc.name == "fused_pool._C"):
            # Built, but not for this torch (e.g. torch was upgraded after the install).
            notes.append(f"the prebuilt fused_pool._C does not load ({exc}); using a build for "
                         "this torch instead")
    else:
        STATE.update(origin="prebuilt", path=getattr(module, "__file__", None))
        return True, f"prebuilt fused_pool._C ({STATE['path']})"

    csrc = source_dir()
    if csrc is None:
        return False, ("fused_pool._C is not built and this install has no C++ sources to build "
                       "it from (fused_pool/_csrc); reinstall fused_pool (`pip install "
                       "fused_pool`, or `pip install --no-build-isolation -e .` in a checkout)")
    if allow_build is None:
        allow_build = os.environ.get("FUSED_POOL_JIT", "1") != "0"
    cuda_srcs, no_cuda = cuda_sources(csrc)
    if cuda_srcs:
        ok, why = _build(csrc, cuda_srcs, allow_build, retry_failed, verbose)
        if ok:
            STATE.update(origin="built" if STATE["seconds"] else "cache", path=why)
            return True, f"first-use build ({why})"
        notes.append(f"the CUDA kernels are not in use: {why}")
        _say("using the CPU kernels only")
    elif no_cuda and os.environ.get("FUSED_POOL_CUDA") == "1":
        return False, "FUSED_POOL_CUDA=1 but " + "; ".join(no_cuda)
    else:
        notes.append("no CUDA kernels: " + "; ".join(no_cuda))
    ok, why = _build(csrc, [], allow_build, retry_failed, verbose)
    if ok:
        STATE.update(origin="built" if STATE["seconds"] else "cache", path=why)
        return True, f"first-use build ({why})"
    return False, why
