"""Command line: ``python -m fused_pool info``, ``python -m fused_pool build``, ``python -m
fused_pool bench`` and ``python -m fused_pool gpu-profile``."""

from __future__ import annotations

import argparse
import platform
import sys


def info() -> int:
    """Print versions, devices and which backends work here (and why not)."""
    import torch

    import fused_pool as fp

    print(f"fused_pool {fp.__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton

        print(f"triton     {triton.__version__}")
    except ImportError:
        print("triton     not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"device     cuda:{i} {p.name} (sm_{p.major}{p.minor}, "
                  f"{p.total_memory / 2**30:.0f} GiB)")
    else:
        print(f"device     cpu ({torch.get_num_threads()} threads); no CUDA device")
    print(f"backend    {fp.get_backend()} (set with fused_pool.set_backend or "
          f"$FUSED_POOL_BACKEND)")
    for name, (ok, why) in fp.backend_status().items():
        print(f"  {name:<7} {'available' if ok else 'unavailable'}: {why}")
    for line in _kernel_lines():
        print(f"  {'':<7} {line}")
    return 0


def _kernel_lines() -> list[str]:
    """Where the "cpp" backend's kernels come from (fused_pool._extension), and why some are not
    in use."""
    from . import _extension

    state = _extension.STATE
    origin, path = state["origin"], state["path"]
    lines = []
    if origin == "prebuilt":
        lines.append(f"kernels: fused_pool._C built at install ({path})")
    elif origin in ("cache", "built"):
        how = (f"built on this import in {state['seconds']:.0f} s" if origin == "built"
               else "built on first use")
        lines.append(f"kernels: {how}, for this torch ({path})")
    elif path:
        lines.append(f"kernels: none loaded; build folder {path}")
    lines += [f"note: {note}" for note in state["notes"]]
    import torch

    from . import _dispatch

    probe = _dispatch.probe("cpp")
    if probe.ok and "cuda" not in probe.devices and torch.cuda.is_available():
        lines.append("note: these kernels have no CUDA kernels (CUDA tensors use another backend)")
    return lines


def build() -> int:
    """Build the "cpp" backend's kernels for this torch now (into the cache folder of
    ``fused_pool._extension``), retrying a build that failed before. Exit status 0 when the
    backend works."""
    import fused_pool as fp  # the import already loads, or builds, them (unless FUSED_POOL_JIT=0)

    from . import _dispatch, _extension

    if not fp.backend_status()["cpp"][0]:
        ok, why = _extension.load(allow_build=True, retry_failed=True)
        if ok:
            _dispatch._probes.pop("cpp", None)  # probe again with the kernels now registered
    ok, why = fp.backend_status()["cpp"]
    for line in _kernel_lines():
        print(line)
    if not ok:
        print(f"cpp backend unavailable: {why}", file=sys.stderr)
        return 1
    print(f"cpp backend available: {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["gpu-profile"]:  # likewise: the static sm_90 profile (no GPU needed)
        from .gpu_profile import main as profile_main

        return profile_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fused_pool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")
    sub.add_parser("build", help="compile the C++ kernels for this torch now (normally done on "
                   "first use; for images and offline machines)")
    sub.add_parser("bench", help="benchmark every op against eager, torch.compile and the copy "
                   "bandwidth (python -m fused_pool bench --help)")
    sub.add_parser("gpu-profile", help="static sm_90 profile of the Triton launches, no GPU "
                   "needed (python -m fused_pool gpu-profile --help)")
    args = parser.parse_args(argv)
    return build() if args.command == "build" else info()


if __name__ == "__main__":
    sys.exit(main())
