"""Command line: ``python -m fused_pool info`` and ``python -m fused_pool bench``."""

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
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m fused_pool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and available backends")
    sub.add_parser("bench", help="benchmark every op against eager, torch.compile and the copy "
                   "bandwidth (python -m fused_pool bench --help)")
    parser.parse_args(argv)
    return info()


if __name__ == "__main__":
    sys.exit(main())
