"""``python -m fused_pool gpu-profile``: a static sm_90 profile of the launches that really run,
with no GPU.

How it works
------------
1. Every op's real Triton launcher (``backends/triton_backend/<family>.py``) is called under
   ``FakeTensorMode`` with ``"cuda"`` tensors (``_capture``). Nothing runs: torch ops only
   propagate shapes, and ``triton.runtime.jit.JITFunction.run`` is replaced by a recorder that
   binds the launch's arguments with the JIT's own binder and specializer (16-byte pointer
   alignment from each tensor's storage offset, ints divisible by 16, ints equal to 1 made
   constants), exactly what the JIT would key its cache on at run time.
2. Each distinct launch is compiled for ``sm_90`` with ``triton.compile`` (ptxas ships with
   Triton) and its cubin is read with ``cuobjdump`` (``_analyze``): registers, local-memory
   (spill) instructions, shared memory, the streaming loop's global load/store widths,
   ``cp.async`` (``LDGSTS``), barriers.
3. The torch ops the launcher runs on the device besides its kernels (prologue work: zeros,
   arange, sums...; allocations and views are free) are counted by a dispatch mode.
4. A simple model turns that into a predicted % of copy bandwidth (``predict``).

The model (constants below; a GPU run calibrates them)
------------------------------------------------------
Little's law: an SM streams ``bytes_in_flight / LATENCY_S`` bytes per second. A CTA whose loop
is not software-pipelined has one tile of loads in flight per iteration, and when a narrow load
(a mask byte, an index) gates the wide data loads of the same iteration it waits two memory
latencies per tile (``chain = 2``); a pipelined loop (``cp.async``) keeps ``stages - 1`` tiles in
flight and its chain is 1. So, per SM::

    in_flight = resident_CTAs * tile_bytes_per_CTA * max(1, stages - 1) / chain
    stream    = min(1, in_flight * SMS / (COPY_BW * LATENCY_S))

Grids below one full wave fill only ``ctas / (resident * SMS)`` of the slots; grids of a few
waves lose the tail wave's idle share (``waves / ceil(waves)``, counted at half weight since
CTAs of a tail finish unevenly). Every extra launch (a prologue op, a combine kernel, a small
second kernel) costs ``LAUNCH_S``. The op's predicted share of copy bandwidth is::

    ideal = op_bytes / COPY_BW ;  predicted = ideal / (ideal / (stream * fill) + extra * LAUNCH_S)

``op_bytes`` are the bytes the op must move (valid tokens of ``x`` only, for masked pooling).
The figures are predictions from compiled code, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

#: H200 copy bandwidth reached by a well-formed copy kernel (bytes / s), and the loaded memory
#: latency the model assumes (s). Calibrate with a GPU run (bench/gpu_check.sh).
COPY_BW = 4.0e12
LATENCY_S = 1.0e-6
#: Cost of one extra kernel launch on the stream (prologue op, combine, small kernel), s.
LAUNCH_S = 2.5e-6
#: sm_90 limits: registers, threads, CTAs and shared memory per SM (bytes; 1 KiB reserved
#: per CTA), register allocation granularity per warp.
REGS_PER_SM, THREADS_PER_SM, CTAS_PER_SM = 65536, 2048, 32
SMEM_PER_SM, SMEM_PER_CTA_RESERVED, REG_GRANULE = 233472, 1024, 256
#: Share of valid tokens of the masked pooling cases (the review's ~62%).
VALID_FRACTION = 0.62

# torch ops that launch no kernel: allocations, views, metadata.
_FREE_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
             "lift_fresh", "detach", "alias", "_local_scalar_dense"}


# ----------------------------------------------------------------------------------------------
# Capture
# ----------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One captured kernel launch: the JIT's own view of it."""

    kernel: str
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: dict
    signature: dict
    key: str = ""
    src: object = field(default=None, repr=False)
    options: dict = field(default_factory=dict, repr=False)


class _Ptr:
    """What a tensor argument is to the JIT's specializer: a dtype and an address. Fake tensors
    have no storage, so every tensor gets a 4 KiB-aligned base plus its storage offset (so views
    such as ``out[:, d:]`` keep their real alignment)."""

    _next = 1 << 32

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        base = getattr(t.untyped_storage(), "_fp_addr", None)
        if base is None:
            base = _Ptr._next
            _Ptr._next += 1 << 32
            with contextlib.suppress(Exception):
                t.untyped_storage()._fp_addr = base
        self._addr = base + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._addr


def _as_args(v):
    if isinstance(v, torch.Tensor):
        return _Ptr(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_as_args(e) for e in v)
    return v


def _recorder(launches: list, backend):
    """A replacement for ``JITFunction.run`` that records and never launches."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    def run(self, *args, grid, warmup, **kwargs):
        args = _as_args(list(args))
        kwargs = {k: _as_args(v) for k, v in kwargs.items()}
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec,
                                                                opts)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        named = {}
        for path, val in constexprs.items():
            name = self.arg_names[path[0]]
            named[name if len(path) == 1 else f"{name}{list(path[1:])}"] = (
                val if isinstance(val, (int, float, bool, str)) else str(val))
        launches.append(Launch(
            kernel=self.fn.__name__, grid=grid, num_warps=options.num_warps,
            num_stages=options.num_stages, constexprs=named,
            signature={k: str(v) for k, v in signature.items()},
            key=repr((self.fn.__qualname__, sorted(signature.items(), key=str),
                      sorted(constexprs.items(), key=str), sorted(attrs.items(), key=str),
                      sorted(options.__dict__.items(), key=str))),
            src=ASTSource(self, signature, constexprs, attrs), options=options.__dict__))
        return None

    return run


def _basic_index(t, idx):
    """``t[idx]`` for basic indices (ints, slices, None, Ellipsis) as aten view ops: the Python
    indexing path wants a CUDA device guard, which a CPU build of torch cannot make even for
    fake tensors."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, dim = t, 0
    for i in idx:
        if i is Ellipsis:
            dim += t.dim() - n_real
        elif i is None:
            out = torch.ops.aten.unsqueeze.default(out, dim)
            dim += 1
        elif isinstance(i, int):
            out = torch.ops.aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            step = 1 if i.step is None else i.step
            out = torch.ops.aten.slice.Tensor(out, dim, i.start, i.stop, step)
            dim += 1
        else:
            raise NotImplementedError(f"index {i!r}")
    return out


class _IndexMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            with contextlib.suppress(NotImplementedError):
                return _basic_index(*args)
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:  # e.g. Tensor.copy_: the same op straight at aten works
            aten = getattr(torch.ops.aten, getattr(func, "__name__", ""), None)
            if "not linked with support for cuda" not in str(e) or aten is None:
                raise
            return aten(*args, **kwargs)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the device ops (kernels) a launcher runs besides its Triton kernels."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        s = func._schema
        aliasing = any(r.alias_info is not None for r in s.returns)
        out = func(*args, **(kwargs or {}))
        # A kernel runs only for an op that writes a CUDA tensor (a CPU scalar is free).
        outs = out if isinstance(out, (tuple, list)) else (out,)
        on_gpu = any(isinstance(o, torch.Tensor) and o.device.type == "cuda" for o in outs)
        if on_gpu and name not in _FREE_OPS and not aliasing:
            self.ops.append(name)
        return out


@contextlib.contextmanager
def _fake_cuda(sms: int):
    """Fake ``"cuda"`` tensors, the SM count of the target GPU, and the Triton recorder."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    from .backends.triton_backend import _layout

    launches: list[Launch] = []
    backend = make_backend(GPUTarget("cuda", 90, 32))
    saved_run, saved_sms = JITFunction.run, _layout.SMS_OVERRIDE
    JITFunction.run = _recorder(launches, backend)
    _layout.SMS_OVERRIDE = sms
    counter = _OpCounter()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), _IndexMode(), counter:
            yield launches, counter
    finally:
        JITFunction.run, _layout.SMS_OVERRIDE = saved_run, saved_sms


# ----------------------------------------------------------------------------------------------
# The ops at a shape
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One op call: which launcher, its arguments (built under the fake mode) and the bytes the
    op must move."""

    op: str
    family: str
    build: object  # () -> (args tuple, op_bytes)


def _cases(b: int, length: int, d: int, dtype: torch.dtype, layers: int = 4,
           heads: int = 4) -> list[Case]:
    dev = "cuda"
    es = torch.empty((), dtype=dtype).element_size()
    xb = b * length * d * es
    vb = xb * VALID_FRACTION  # bytes of x's valid tokens
    mb = b * length  # bool mask
    out_b = b * d * es

    def x_():
        return torch.empty(b, length, d, dtype=dtype, device=dev)

    def m_():
        return torch.empty(b, length, dtype=torch.bool, device=dev)

    def g_(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device=dev)

    i64 = torch.int64
    f32 = torch.float32
    rows = (b, length, d)
    cases = [
        Case("masked_mean", "pool", lambda: ((x_(), m_(), None), vb + mb + out_b)),
        Case("masked_mean_backward", "pool",
             lambda: ((g_(b, d), m_(), None, length), xb + mb + out_b)),
        Case("masked_extremum", "pool",
             lambda: ((x_(), m_(), None, True), vb + mb + out_b + b * d * 8)),
        Case("index_pool_backward", "pool",
             lambda: ((g_(b, 1, d), g_(b, 1, d, dt=i64), None, length), xb + out_b + b * d * 8)),
        Case("masked_mean_max", "pool",
             lambda: ((x_(), m_(), None), vb + mb + 2 * out_b + b * d * 8)),
        Case("masked_mean_max_backward", "pool",
             lambda: ((g_(b, 2 * d), g_(b, d, dt=i64), m_(), None, length),
                      xb + mb + 2 * out_b + b * d * 8)),
        Case("masked_kmax", "pool",
             lambda: ((x_(), m_(), None, 4), vb + mb + 4 * (out_b + b * d * 8))),
        Case("attention_pool", "weighted",
             lambda: ((x_(), g_(b, length, heads), m_(), None),
                      vb + mb + out_b + b * length * heads * es)),
        Case("attention_pool_backward", "weighted",
             lambda: ((g_(b, d), x_(), g_(b, length, heads), m_(), None, g_(b, d),
                       g_(b, heads, dt=f32)), vb + xb + mb + 2 * b * length * heads * es)),
        Case("weighted_layer_pool", "weighted",
             lambda: (([x_() for _ in range(layers)], g_(layers, dt=f32)), (layers + 1) * xb)),
        Case("weighted_layer_pool_backward", "weighted",
             lambda: ((x_(), [x_() for _ in range(layers)], g_(layers, dt=f32)),
                      (2 * layers + 1) * xb)),
        Case("weighted_layer_mean", "weighted",
             lambda: (([x_() for _ in range(layers)], g_(layers, dt=f32), m_()),
                      layers * vb + mb + out_b)),
        Case("weighted_layer_mean_backward", "weighted",
             lambda: ((g_(b, d), [x_() for _ in range(layers)], g_(layers, dt=f32), m_()),
                      layers * (vb + xb) + mb)),
        Case("layer_norm", "norm",
             lambda: ((g_(*rows), 1, g_(d), g_(d), 1e-5), 2 * xb + 8 * b * length)),
        Case("layer_norm_backward", "norm",
             lambda: ((g_(*rows), g_(*rows), 1, g_(d), g_(d), g_(b, length, dt=f32),
                       g_(b, length, dt=f32)), 3 * xb + 8 * b * length)),
        Case("rms_norm", "norm", lambda: ((g_(*rows), 1, g_(d), 1e-6), 2 * xb + 4 * b * length)),
        Case("rms_norm_backward", "norm",
             lambda: ((g_(*rows), g_(*rows), 1, g_(d), g_(b, length, dt=f32)),
                      3 * xb + 4 * b * length)),
        Case("masked_instance_norm", "norm",
             lambda: ((x_(), m_(), None, g_(d), g_(d), 1e-5), vb + xb + mb + 8 * b * d)),
        Case("masked_instance_norm_backward", "norm",
             lambda: ((x_(), x_(), m_(), None, g_(d), g_(d), g_(b, d, dt=f32), g_(b, d, dt=f32)),
                      2 * vb + vb + xb + mb)),
    ]
    return cases


def _launcher(case: Case):
    from .backends.triton_backend import norm, pool, weighted

    return {"pool": pool, "weighted": weighted, "norm": norm}[case.family].IMPLEMENTATIONS[
        case.op]


def capture(case: Case, sms: int) -> tuple[list[Launch], list[str], float]:
    """``(launches, prologue ops, op_bytes)`` of one op call under fake CUDA tensors."""
    fn = _launcher(case)
    with _fake_cuda(sms) as (launches, counter):
        args, op_bytes = case.build()
        counter.ops.clear()  # building the inputs is not the launcher's work
        fn(*args)
    return launches, list(counter.ops), float(op_bytes)


# ----------------------------------------------------------------------------------------------
# Compile and read the cubin
# ----------------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    import triton

    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return here if os.path.exists(here) else shutil.which(name)


_WIDTH = re.compile(r"\b(LDG|STG|LDGSTS)((?:\.[A-Z0-9_]+)*)")


def _access_bits(mods: str) -> int:
    """Bits per thread of one LDG/STG from its SASS modifiers (``.E.128``, ``.E.U16``...)."""
    for m, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8),
                    (".S8", 8)):
        if m in mods:
            return bits
    return 32


@dataclass
class Sass:
    regs: int = 0
    shared: int = 0
    local: int = 0
    spills: int = 0  # LDL/STL instructions
    loop_instr: int = 0
    loop_loads: list = field(default_factory=list)  # bits per thread of each LDG in the loop
    loop_stores: list = field(default_factory=list)
    loop_bars: int = 0
    cp_async: bool = False
    loads: list = field(default_factory=list)  # all LDG widths, whole kernel
    stores: list = field(default_factory=list)


def parse_sass(sass: str) -> Sass:
    """Reads SASS text (``cuobjdump -sass``): spills, widths, and the streaming loop, the
    backward-branching region with the most global memory instructions."""
    out = Sass()
    instrs: list[str] = []
    addrs: dict[int, int] = {}  # SASS address -> instruction number
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addrs[int(m.group(1), 16)] = len(instrs)
            instrs.append(m.group(2))
    loops = []
    for i, ins in enumerate(instrs):
        br = re.search(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)", ins)
        if br:
            target = addrs.get(int(br.group(1), 16))
            if target is not None and target < i:  # a backward branch closes a loop
                loops.append((target, i + 1))
    for ins in instrs:
        if re.search(r"\b(LDL|STL)\b", ins):
            out.spills += 1
        for op, mods in _WIDTH.findall(ins):
            if op == "LDGSTS":
                out.cp_async = True
            (out.loads if op != "STG" else out.stores).append(_access_bits(mods))
    best = None
    for lo, hi in loops:
        body = instrs[lo:hi]
        n_mem = sum(len(_WIDTH.findall(x)) for x in body)
        if n_mem and (best is None or n_mem > best[0]):
            best = (n_mem, body)
    if best:
        body = best[1]
        out.loop_instr = len(body)
        out.loop_bars = sum(1 for x in body if re.search(r"\bBAR\b", x))
        for x in body:
            for op, mods in _WIDTH.findall(x):
                if op == "LDGSTS":
                    out.cp_async = True
                (out.loop_loads if op != "STG" else out.loop_stores).append(_access_bits(mods))
    return out


def _analyze(kernel) -> Sass:
    """Registers, shared/local memory and the SASS facts of a compiled Triton kernel."""
    cubin = kernel.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        tool = _tool("cuobjdump")
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
    s = parse_sass(sass)
    if "cp.async" in kernel.asm.get("ptx", ""):
        s.cp_async = True
    m = re.search(r"REG:(\d+)", res)
    s.regs = int(m.group(1)) if m else 0
    m = re.search(r"LOCAL:(\d+)", res)
    s.local = int(m.group(1)) if m else 0
    s.shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    return s


_compiled: dict[str, object] = {}


def compile_launch(launch: Launch):
    """``triton.compile`` of a captured launch for sm_90 (cached by the JIT's key)."""
    import triton
    from triton.backends.compiler import GPUTarget

    k = _compiled.get(launch.key)
    if k is None:
        k = triton.compile(launch.src, target=GPUTarget("cuda", 90, 32), options=launch.options)
        _compiled[launch.key] = k
    return k


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def resident_ctas(regs: int, warps: int, smem: int) -> int:
    """CTAs of one kernel resident on an sm_90 SM (registers, threads, shared memory)."""
    per_warp = math.ceil(max(regs, 1) * 32 / REG_GRANULE) * REG_GRANULE
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_threads = THREADS_PER_SM // (32 * warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_PER_CTA_RESERVED)
    return max(0, min(by_regs, by_threads, by_smem, CTAS_PER_SM))


@dataclass
class KernelRow:
    op: str
    kernel: str
    grid: tuple
    ctas: int
    warps: int
    stages: int
    regs: int
    spills: int
    shared: int
    resident: int
    waves: float
    loop_instr: int
    loop_loads: str
    loop_stores: str
    cp_async: bool
    barriers: int
    in_flight_kb: float  # bytes in flight per SM (KiB)
    stream: float  # Little's-law share of copy bandwidth of the streaming loop
    fill: float  # share of the SM slots the grid keeps busy
    constexprs: dict = field(default_factory=dict)


def _widths(bits: list) -> str:
    if not bits:
        return "-"
    counts: dict[int, int] = {}
    for b_ in bits:
        counts[b_] = counts.get(b_, 0) + 1
    return " ".join(f"{n}x{w}" for w, n in sorted(counts.items(), reverse=True))


def kernel_row(op: str, launch: Launch, s: Sass, sms: int) -> KernelRow:
    ctas = launch.grid[0] * launch.grid[1] * launch.grid[2]
    res = resident_ctas(s.regs, launch.num_warps, s.shared)
    slots = max(res * sms, 1)
    waves = ctas / slots
    if waves <= 1:
        fill = waves
    else:
        fill = 1 - 0.5 * (1 - waves / math.ceil(waves))
    threads = 32 * launch.num_warps
    # A loop-less kernel (one row or block per CTA) has all of its accesses in flight at once.
    loads, stores = (s.loop_loads, s.loop_stores) if s.loop_instr else (s.loads, s.stores)
    tile = (sum(loads) + sum(stores)) / 8 * threads  # bytes one CTA moves per iteration
    # A narrow load (mask byte, index) in a loop that also makes wide loads gates them.
    narrow = any(b_ < 64 for b_ in loads) and any(b_ >= 64 for b_ in loads)
    chain = 1 if s.cp_async or not narrow else 2
    depth = max(1, launch.num_stages - 1) if s.cp_async else 1
    resident_now = min(res, max(1, math.ceil(ctas / sms)))
    in_flight = resident_now * tile * depth / chain
    if loads and tile:
        stream = min(1.0, in_flight * sms / (COPY_BW * LATENCY_S))
    else:  # stores only: nothing waits on memory
        stream = 1.0
    return KernelRow(op, launch.kernel, launch.grid, ctas, launch.num_warps, launch.num_stages,
                     s.regs, s.spills, s.shared, res, round(waves, 2), s.loop_instr,
                     _widths(s.loop_loads), _widths(s.loop_stores), s.cp_async, s.loop_bars,
                     round(in_flight / 1024, 1), round(stream, 3), round(fill, 3),
                     launch.constexprs)


@dataclass
class OpRow:
    op: str
    launches: int
    prologue_ops: list
    op_mb: float
    predicted_pct: float
    kernels: list


def predict(op: str, rows: list[KernelRow], prologue: list[str], op_bytes: float) -> OpRow:
    """The op's predicted % of copy bandwidth (module docstring). The main kernel is the one
    with the most loop loads across its grid; every other launch and prologue op costs
    ``LAUNCH_S``."""
    ideal = op_bytes / COPY_BW
    if rows:
        main = max(rows, key=lambda r: (r.ctas * max(len(r.loop_loads), 1), r.ctas))
        eff = max(main.stream * main.fill, 1e-3)
        t = ideal / eff + (len(rows) - 1 + len(prologue)) * LAUNCH_S
    else:
        t = ideal + len(prologue) * LAUNCH_S
    return OpRow(op, len(rows), prologue, round(op_bytes / 1e6, 1),
                 round(100 * ideal / t, 1) if t > 0 else 0.0, [asdict(r) for r in rows])


def profile(ops=None, shape=(32, 2048, 4096), dtype=torch.bfloat16, sms=132,
            log=None) -> list[OpRow]:
    """Capture, compile and model every op in ``ops`` (all by default) at ``shape``."""
    b, length, d = shape
    out = []
    for case in _cases(b, length, d, dtype):
        if ops and case.op not in ops:
            continue
        launches, prologue, op_bytes = capture(case, sms)
        rows = []
        for ln in launches:
            s = _analyze(compile_launch(ln))
            rows.append(kernel_row(case.op, ln, s, sms))
        out.append(predict(case.op, rows, prologue, op_bytes))
        if log:
            log(out[-1])
    return out


# ----------------------------------------------------------------------------------------------
# CUDA extension kernels
# ----------------------------------------------------------------------------------------------


def cuda_extension_table() -> list[dict] | None:
    """Registers, spills, shared memory and load/store widths of every kernel in the built
    extension's sm_90 code (``cuobjdump``), or None when it was built without CUDA."""
    import glob

    here = os.path.dirname(__file__)
    libs = glob.glob(os.path.join(here, "_C*.so"))
    tool = _tool("cuobjdump")
    if not libs or not tool:
        return None
    res = subprocess.run([tool, "--dump-resource-usage", libs[0]], capture_output=True,
                         text=True).stdout
    if "Function" not in res:
        return None
    sass = subprocess.run([tool, "-sass", libs[0]], capture_output=True, text=True).stdout
    bodies = re.split(r"\n\s*Function : ", sass)
    facts = {}
    for body in bodies[1:]:
        name = body.split("\n", 1)[0].strip()
        facts[name] = parse_sass(body)
    rows = []
    for m in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) "
                         r"LOCAL:(\d+)", res):
        name = m.group(1)
        s = facts.get(name, Sass())
        rows.append(dict(kernel=_demangle(name), regs=int(m.group(2)), stack=int(m.group(3)),
                         shared=int(m.group(4)), local=int(m.group(5)), spills=s.spills,
                         resident_256=resident_ctas(int(m.group(2)), 8, int(m.group(4))),
                         loop_loads=_widths(s.loop_loads), loop_stores=_widths(s.loop_stores),
                         cp_async=s.cp_async))
    return rows


def _demangle(name: str) -> str:
    cxx = shutil.which("c++filt")
    if not cxx:
        return name
    r = subprocess.run([cxx, name], capture_output=True, text=True)
    return r.stdout.strip()[:90] or name


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def format_table(rows: list[OpRow]) -> str:
    lines = [f"{'op / kernel':<34}{'grid':>16}{'w':>3}{'st':>3}{'regs':>5}{'spl':>4}"
             f"{'smem':>7}{'res':>4}{'waves':>6}{'loop ld':>12}{'loop st':>10}{'cp.a':>5}"
             f"{'bar':>4}{'KiB/SM':>7}{'pred%':>7}"]
    for r in rows:
        pro = f" prologue ops: {len(r.prologue_ops)} ({', '.join(r.prologue_ops)})" \
            if r.prologue_ops else ""
        lines.append(f"{r.op:<34}{'':>16}{'':>74}{r.predicted_pct:>7.0f}  "
                     f"[{r.launches} launch(es), {r.op_mb:.0f} MB]{pro}")
        for k in r.kernels:
            grid = "x".join(str(g) for g in k["grid"])
            lines.append(
                f"  {k['kernel'][:32]:<32}{grid:>16}{k['warps']:>3}{k['stages']:>3}"
                f"{k['regs']:>5}{k['spills']:>4}{k['shared']:>7}{k['resident']:>4}"
                f"{k['waves']:>6.2f}{k['loop_loads'][:11]:>12}{k['loop_stores'][:9]:>10}"
                f"{'y' if k['cp_async'] else '-':>5}{k['barriers']:>4}{k['in_flight_kb']:>7.0f}"
                f"{100 * k['stream'] * k['fill']:>7.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_pool gpu-profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--shape", default="32,2048,4096", help="B,L,D (norms: rows B*L, D)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32",
                                                           "float64"])
    p.add_argument("--sms", type=int, default=132, help="SMs of the target GPU (H200: 132)")
    p.add_argument("--json", default="", help="write the rows (and CUDA kernels) here")
    p.add_argument("--no-cuda-ext", action="store_true", help="skip the extension's kernels")
    a = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    from .backends.triton_backend import _layout

    if _layout.INTERPRET:
        print("gpu-profile needs TRITON_INTERPRET unset at import", file=sys.stderr)
        return 2
    shape = tuple(int(v) for v in a.shape.split(","))
    ops = [o for o in a.ops.split(",") if o]
    rows = profile(ops, shape, getattr(torch, a.dtype), a.sms)
    print(f"static sm_90 profile: shape {shape}, {a.dtype}, {a.sms} SMs; model: copy "
          f"{COPY_BW / 1e12:.1f} TB/s, latency {LATENCY_S * 1e6:.1f} us, launch "
          f"{LAUNCH_S * 1e6:.1f} us (predictions, not measurements)")
    print(format_table(rows))
    ext = None if a.no_cuda_ext else cuda_extension_table()
    if ext:
        print("\nCUDA extension kernels (sm_90 cubin of fused_pool/_C):")
        print(f"{'kernel':<70}{'regs':>5}{'spl':>4}{'smem':>7}{'res@256':>8}{'loop ld':>12}"
              f"{'loop st':>10}")
        for r in ext:
            print(f"{r['kernel'][:69]:<70}{r['regs']:>5}{r['spills']:>4}{r['shared']:>7}"
                  f"{r['resident_256']:>8}{r['loop_loads'][:11]:>12}{r['loop_stores'][:9]:>10}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(shape=shape, dtype=a.dtype, sms=a.sms,
                           model=dict(copy_bw=COPY_BW, latency_s=LATENCY_S, launch_s=LAUNCH_S),
                           ops=[asdict(r) for r in rows], cuda_extension=ext), f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
