"""Benchmark output: progress, the terminal table, CSV/JSON files and PNG plots."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import sys

import torch


def note(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def header(meta, shape, copy_bw, read_bw, backends) -> None:
    b, length, d = shape
    print(f"device {meta['device']} | torch {meta['torch']} | triton {meta['triton'] or '-'} | "
          f"commit {meta['commit'] or '-'}")
    print(f"shape B={b} L={length} D={d} | copy bandwidth {copy_bw:.1f} GB/s (copy_), "
          f"read {read_bw:.1f} GB/s (sum) | fused_pool backends: {', '.join(backends) or '-'}",
          flush=True)


class _Progress:
    def __init__(self, total: int, quiet: bool):
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass
        self.quiet, self.done, self.total = quiet, 0, total

    def set(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description(what)
        elif not self.quiet:
            print(f"[{self.done + 1}/{self.total}] {what}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(total: int, quiet: bool) -> _Progress:
    return _Progress(total, quiet)


def add_speedups(rows) -> None:
    """Fill ``speedup_vs_eager`` / ``speedup_vs_compile``: baseline ms / row ms, per case."""
    base = {}
    for r in rows:
        if r.impl in ("eager", "compile"):
            base[(r.op, r.dtype, r.mode, r.impl)] = r.median_ms
    for r in rows:
        e = base.get((r.op, r.dtype, r.mode, "eager"))
        c = base.get((r.op, r.dtype, r.mode, "compile"))
        r.speedup_vs_eager = e / r.median_ms if e else None
        r.speedup_vs_compile = c / r.median_ms if c else None


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return format(v, spec)


def table(rows) -> None:
    cols = [("op", 20), ("impl", 10), ("dtype", 5), ("mode", 6), ("ms", 9), ("GB/s", 8),
            ("%copy", 6), ("x eager", 8), ("x compile", 9), ("peak MB", 8), ("max err", 9)]
    print()
    print("  ".join(name.rjust(w) if i > 3 else name.ljust(w) for i, (name, w) in
                    enumerate(cols)))
    last = None
    for r in rows:
        if last is not None and (r.op, r.dtype) != last:
            print()
        last = (r.op, r.dtype)
        peak = None if r.peak_extra_bytes is None else r.peak_extra_bytes / 2**20
        cells = [r.op, r.impl, r.dtype, r.mode, _fmt(r.median_ms, ".3f"), _fmt(r.gbps, ".1f"),
                 _fmt(r.pct_copy_bw, ".0f"), _fmt(r.speedup_vs_eager, ".2f"),
                 _fmt(r.speedup_vs_compile, ".2f"), _fmt(peak, ".1f"),
                 _fmt(r.max_error, ".1e")]
        print("  ".join(c.rjust(w) if i > 3 else c.ljust(w) for i, (c, (_, w)) in
                        enumerate(zip(cells, cols))))
    print(flush=True)


def slug(device_name: str, device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu-{torch.get_num_threads()}threads"
    name = re.sub(r"^nvidia\s+", "", device_name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def write(rows, out: str, meta: dict) -> list[str]:
    csv_path = os.path.join(out, "results.csv")
    json_path = os.path.join(out, "results.json")
    names = [f.name for f in dataclasses.fields(rows[0])] if rows else []
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for r in rows:
            w.writerow([getattr(r, n) for n in names])
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    return [csv_path, json_path]


def sweep_and_plot(args, shape, dtype, backends, baselines, device, copy_bw, out) -> list[str]:
    """Forward GB/s vs L (D fixed) and vs D (L fixed) for each op and implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("--plot needs matplotlib (pip install matplotlib)")
        return []
    from . import run as run_rows

    b, length, d = shape
    sweeps = {"L": [max(1, length * f // 4) for f in (1, 2, 4, 8)],
              "D": [max(1, d * f // 4) for f in (1, 2, 4, 8)]}
    paths = []
    for axis, values in sweeps.items():
        series: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for v in values:
            s = (b, v, d) if axis == "L" else (b, length, v)
            a = _copy_args(args, shape=",".join(map(str, s)), dtypes=dtype, modes="fwd",
                           no_memory=True, no_error=True, quiet=True,
                           baselines=",".join(sorted(baselines)),
                           backends=",".join(backends))
            rows = run_rows(a)[0]
            for r in rows:
                series.setdefault((r.op, r.impl), []).append((v, r.gbps))
        ops = sorted({op for op, _ in series})
        ncols = min(3, len(ops))
        nrows = (len(ops) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        for ax, op in zip(axes.flat, ops):
            for (o, impl), pts in sorted(series.items()):
                if o == op:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=impl)
            ax.axhline(copy_bw, color="gray", linestyle="--", label="copy bandwidth")
            ax.set_title(op)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(axis)
            ax.set_ylabel("GB/s (forward)")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(ops):]:
            ax.axis("off")
        other = f"D={d}" if axis == "L" else f"L={length}"
        where = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else slug("", device))
        fig.suptitle(f"forward GB/s vs {axis} ({other}, B={b}, {dtype}, padding "
                     f"{args.padding}) on {where}")
        fig.tight_layout()
        path = os.path.join(out, f"bandwidth_vs_{axis}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _copy_args(args, **changes):
    import argparse

    ns = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(ns, k, v)
    return ns


def markdown(rows, impl: str) -> str:
    """A README table for one implementation: per op and mode, ms and its speedups."""
    lines = ["| op | mode | ms | GB/s | % copy bw | × eager | × compile |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.impl != impl:
            continue
        lines.append(f"| {r.op} | {r.mode} | {_fmt(r.median_ms, '.2f')} | {_fmt(r.gbps, '.1f')} | "
                     f"{_fmt(r.pct_copy_bw, '.0f')} | {_fmt(r.speedup_vs_eager, '.1f')} | "
                     f"{_fmt(r.speedup_vs_compile, '.2f')} |")
    return "\n".join(lines)


def load_rows(path: str):
    """Rows of a results.csv written by ``write``, with numbers parsed back."""
    from . import Row

    out = []
    with open(path) as f:
        for d in csv.DictReader(f):
            kw = {}
            for field in dataclasses.fields(Row):
                v = d[field.name]
                if field.name in ("median_ms", "gbps", "pct_copy_bw", "speedup_vs_eager",
                                  "speedup_vs_compile", "max_error"):
                    kw[field.name] = None if v in ("", "None") else float(v)
                elif field.name == "peak_extra_bytes":
                    kw[field.name] = None if v in ("", "None") else int(v)
                else:
                    kw[field.name] = v
            out.append(Row(**kw))
    return out
