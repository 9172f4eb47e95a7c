"""``python -m fused_pool bench``: every op, forward and forward+backward, every backend, beside
the eager seed-style code, ``torch.compile`` of a clean formulation and the device's measured copy
bandwidth, all timed in one run. See ``python -m fused_pool bench --help``."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, fields, replace

import torch

import fused_pool as fp
from fused_pool import _dispatch

from . import report
from .cases import OPS, Inputs, OpCase, liger_fn, make_inputs
from .timing import Timer, copy_bandwidth, peak_extra_bytes, read_bandwidth

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# The target shapes of docs/performance.md: CPU (2 cores) fp32 and NVIDIA H200 bf16.
DEFAULTS = {"cpu": ((32, 512, 768), "fp32"), "cuda": ((32, 2048, 4096), "bf16")}


@dataclass
class Row:
    op: str
    impl: str
    dtype: str
    shape: str
    padding: str
    mode: str
    median_ms: float
    gbps: float
    pct_copy_bw: float
    speedup_vs_eager: float | None
    speedup_vs_compile: float | None
    peak_extra_bytes: int | None
    max_error: float | None
    device: str
    torch: str
    triton: str
    commit: str


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fused_pool bench", description=__doc__)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--ops", default="all", help=f"comma list of: {', '.join(OPS)} (or 'all', "
                   "'pool', 'norm')")
    p.add_argument("--shape", default=None, help="B,L,D (default: 32,512,768 on CPU; "
                   "32,2048,4096 on CUDA)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32, fp16, bf16, fp64 "
                   "(default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--padding", default="uniform", help="'uniform' (lengths uniform in "
                   "[L/4, L]) or the padded fraction of every sequence, e.g. 0.5")
    p.add_argument("--backends", default=None, help="fused_pool backends to time (default: "
                   "every available one that runs on the device)")
    p.add_argument("--baselines", default="eager,compile,liger",
                   help="baselines to time beside the backends (any of eager, compile, liger)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per row (at most)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per row")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-error", action="store_true", help="skip the float64 error check")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/"
                   "<device>)")
    p.add_argument("--plot", action="store_true", help="also sweep L and D and write PNG "
                   "plots of GB/s (forward)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--markdown", metavar="RESULTS_CSV", default=None,
                   help="print a Markdown table (per implementation) of a results.csv and exit")
    return p.parse_args(argv)


def _ops(spec: str) -> list[str]:
    if spec == "all":
        return list(OPS)
    groups = {"pool": [n for n in OPS if "norm" not in n], "norm": [n for n in OPS if "norm" in n]}
    names = []
    for name in spec.split(","):
        if name in groups:
            names += groups[name]
        elif name in OPS:
            names.append(name)
        else:
            raise SystemExit(f"bench: unknown op {name!r}; choose from {', '.join(OPS)}")
    return names


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _to(inp: Inputs, dtype) -> Inputs:
    """A copy of the inputs with every float tensor in ``dtype`` (for the float64 reference)."""
    def conv(t):
        return t.detach().to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() \
            else t
    return replace(inp, **{f.name: ([conv(t) for t in getattr(inp, f.name)]
                                    if isinstance(getattr(inp, f.name), list)
                                    else conv(getattr(inp, f.name))) for f in fields(inp)})


class _Impl:
    """One implementation of an op: a callable on ``Inputs`` run under a given backend."""

    def __init__(self, name, fn, backend=None):
        self.name, self.fn, self.backend = name, fn, backend

    @contextlib.contextmanager
    def active(self):
        if self.backend is None:
            yield
        else:
            with fp.use_backend(self.backend):
                yield


def _impls(case: OpCase, backends, baselines) -> list[_Impl]:
    out = []
    if "eager" in baselines:
        out.append(_Impl("eager", case.eager))
    if "compile" in baselines:
        out.append(_Impl("compile", torch.compile(case.clean)))
    lig = liger_fn(case) if "liger" in baselines else None
    if lig is not None:
        out.append(_Impl("liger", lig))
    out += [_Impl(f"fp:{b}", case.fused, b) for b in backends]
    return out


def _leaves(case: OpCase, inp: Inputs, grad: bool):
    leaves = case.grad_inputs(inp)
    for t in leaves:
        t.requires_grad_(grad)
    return leaves


def _max_error(got, want) -> float:
    if got is None or want is None:
        return float("nan")
    errs = [(g.double() - w.double()).abs().max().item() for g, w in zip(got, want)
            if g is not None and g.numel()]
    return max(errs) if errs else 0.0


def _step(case, inp, mode, impl_fn, gout):
    """One call in ``mode``; returns what the error check compares (output or gradients)."""
    if mode == "fwd":
        with torch.no_grad():
            return [impl_fn(inp)]
    leaves = case.grad_inputs(inp)
    for t in leaves:
        t.grad = None
    out = impl_fn(inp)
    out.backward(gout.to(out.dtype))
    return [t.grad for t in leaves]


def run(args, out: str | None = None, extra_meta: dict | None = None):
    """Time every (op, dtype, implementation, mode); with ``out``, rewrite the results files
    after each op so an interrupted run still leaves what it measured."""
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    (b, length, d), default_dtype = DEFAULTS[device.type]
    if args.shape:
        b, length, d = (int(v) for v in args.shape.split(","))
    dtypes = (args.dtypes or default_dtype).split(",")
    modes = args.modes.split(",")
    backends = (args.backends.split(",") if args.backends else
                [n for n in fp.available_backends() if _dispatch._runs_on(n, device.type)])
    baselines = set(args.baselines.split(",")) if args.baselines else set()
    timer = Timer(device, args.warmup, args.repeats, args.budget)
    nbytes = b * length * d * 4
    copy_bw, read_bw = copy_bandwidth(timer, nbytes), read_bandwidth(timer, nbytes)
    meta = {"device": _device_name(device), "torch": torch.__version__,
            "triton": _triton_version(), "commit": _commit()}
    report.header(meta, (b, length, d), copy_bw, read_bw, backends)

    ops = _ops(args.ops)
    plan = [(op, dt) for op in ops for dt in dtypes]
    bar = report.progress(len(plan) * len(modes) * (len(backends) + len(baselines)),
                          args.quiet)
    rows: list[Row] = []
    for op, dt in plan:
        case = OPS[op]
        dtype = DTYPES[dt]
        # Two copies of the inputs, alternated, so no call finds its data in cache.
        inputs = [make_inputs(b, length, d, dtype, device, args.padding, case.need)
                  for _ in range(2)]
        refs = {}
        with torch.no_grad():
            gout = torch.randn(case.clean(inputs[0]).shape, device=device)
        for impl in _impls(case, backends, baselines):
            for mode in modes:
                bar.set(f"{op} {dt} {impl.name} {mode}")
                for inp in inputs:
                    _leaves(case, inp, mode == "fwdbwd")
                with impl.active():
                    try:
                        def call(i, case=case, inputs=inputs, impl=impl, mode=mode, gout=gout):
                            return _step(case, inputs[i % 2], mode, impl.fn, gout)

                        ms = timer.median_ms(call)
                        # Free the previous call's gradients first, so the peak counts the
                        # gradients this call allocates (a freed old one would offset them).
                        for inp in inputs:
                            for t in case.grad_inputs(inp):
                                t.grad = None
                        peak = None if args.no_memory else peak_extra_bytes(
                            lambda call=call: call(0), device)
                        err = None
                        if not args.no_error:
                            if mode not in refs:
                                refs[mode] = _reference(case, inputs[0], mode, gout)
                            err = _max_error(call(0), refs[mode])
                    except Exception as exc:  # a baseline that cannot run this case
                        report.note(f"{op} {dt} {impl.name} {mode}: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0][:200]}")
                        bar.advance()
                        continue
                moved = case.fwd_bytes(inputs[0]) + (case.bwd_bytes(inputs[0])
                                                     if mode == "fwdbwd" else 0)
                gbps = moved / (ms * 1e-3) / 1e9
                rows.append(Row(op, impl.name, dt, f"{b}x{length}x{d}", str(args.padding), mode,
                                ms, gbps, 100 * gbps / copy_bw, None, None, peak, err,
                                **meta))
                bar.advance()
        if out is not None:
            report.add_speedups(rows)
            report.write(rows, out, {**meta, "copy_gbps": copy_bw, "read_gbps": read_bw,
                                     **(extra_meta or {})})
    bar.close()
    report.add_speedups(rows)
    return rows, meta, copy_bw, read_bw, (b, length, d), dtypes, backends, baselines, device


def _reference(case: OpCase, inp: Inputs, mode: str, gout):
    """The float64 result of the ``"torch"`` reference backend on the same (upcast) inputs."""
    ref_inp = _to(inp, torch.float64)
    _leaves(case, ref_inp, mode == "fwdbwd")
    with fp.use_backend("torch"):
        out = _step(case, ref_inp, mode, case.fused, gout.double())
    return [t.detach() if t is not None else None for t in out]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.markdown:
        rows = report.load_rows(args.markdown)
        for impl in dict.fromkeys(r.impl for r in rows):
            if impl.startswith("fp:"):
                print(f"\n{impl}\n\n{report.markdown(rows, impl)}")
        return 0
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    out = args.out or os.path.join("bench", "results",
                                   report.slug(_device_name(device), device))
    os.makedirs(out, exist_ok=True)
    stamp = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": argv}
    rows, meta, copy_bw, read_bw, shape, dtypes, backends, baselines, device = run(
        args, out, stamp)
    report.table(rows)
    paths = report.write(rows, out, {**meta, "copy_gbps": copy_bw, "read_gbps": read_bw,
                                     **stamp})
    if args.plot:
        paths += report.sweep_and_plot(args, shape, dtypes[0], backends, baselines, device,
                                       copy_bw, out)
    report.note("wrote " + ", ".join(paths))
    return 0
