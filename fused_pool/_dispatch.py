"""Backend selection: the one place that decides which implementation runs for (op, device).

Backends (their code and ``torch.library`` namespaces: ``backends/__init__.py``), in the order
``"auto"`` tries them:

* ``"triton"``: Triton kernels; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set
  before Triton was imported. ``"auto"`` uses it for CUDA only.
* ``"cpp"``: the kernels compiled from ``csrc/`` (``fused_pool._C`` from the install, or the
  first-use build of ``_extension.py``); CPU kernels and, when built with CUDA, CUDA kernels.
* ``"torch"``: the pure-PyTorch reference; every device.

Importing fused_pool probes every backend once (``probe_all``) and records why one is
unavailable, so errors can name what is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import _ops
from ._schema import SCHEMAS
from .backends import BACKENDS as _TABLE

BACKENDS: tuple[str, ...] = tuple(_TABLE)
ENV_VAR = "FUSED_POOL_BACKEND"


@dataclass
class _Probe:
    ok: bool
    reason: str = ""
    devices: frozenset[str] = field(default_factory=frozenset)


def _probe_torch() -> _Probe:
    reference = importlib.import_module(_TABLE["torch"].module)
    _ops.register_backend(_TABLE["torch"].namespace, reference.IMPLEMENTATIONS)
    return _Probe(True, devices=frozenset({"*"}))


def _has_kernel(ns: str, key: str) -> bool:
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{name}", key) for name in SCHEMAS
    )


def _probe_cpp() -> _Probe:
    from . import _extension

    # fused_pool._C from the install, else the kernels built for this torch on first use.
    loaded, why = _extension.load()
    if not loaded:
        return _Probe(False, why)
    ns = _TABLE["cpp"].namespace
    missing = [n for n in SCHEMAS if not hasattr(getattr(torch.ops, ns), n)]
    if missing:
        return _Probe(False, f"fused_pool._C lacks the operators {', '.join(missing)}")
    _ops.register_backend(ns)
    devices = {d for d, key in (("cpu", "CPU"), ("cuda", "CUDA")) if _has_kernel(ns, key)}
    if not devices:
        return _Probe(False, "fused_pool._C has no CPU or CUDA kernels registered")
    return _Probe(True, devices=frozenset(devices))


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> _Probe:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return _Probe(False, f"Triton is not installed ({exc}); `pip install triton`")
    module = importlib.import_module(_TABLE["triton"].module)
    devices = set()
    if torch.cuda.is_available():
        devices.add("cuda")
    if _triton_interpreting():
        devices.add("cpu")
    if not devices:
        return _Probe(
            False,
            "Triton needs a CUDA device (none found), or TRITON_INTERPRET=1 for CPU tensors",
        )
    _ops.register_backend(_TABLE["triton"].namespace, module.IMPLEMENTATIONS,
                          module.dispatch_keys(devices))
    return _Probe(True, devices=frozenset(devices))


_PROBERS = {"triton": _probe_triton, "cpp": _probe_cpp, "torch": _probe_torch}
_probes: dict[str, _Probe] = {}


def probe(name: str) -> _Probe:
    """Availability of backend ``name`` (cached after the first call)."""
    if name not in _probes:
        try:
            _probes[name] = _PROBERS[name]()
        except Exception as exc:  # a broken install must not break the other backends
            _probes[name] = _Probe(False, f"loading failed: {type(exc).__name__}: {exc}")
    return _probes[name]


def probe_all() -> None:
    """Probe every backend now. Called when fused_pool is imported: registering operators
    while ``torch.compile`` traces the first call would break the graph."""
    for name in BACKENDS:
        probe(name)


def backend_status() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason or the devices it runs on)}`` for every backend."""
    out = {}
    for name in BACKENDS:
        p = probe(name)
        where = "all devices" if "*" in p.devices else ", ".join(sorted(p.devices))
        out[name] = (p.ok, where if p.ok else p.reason)
    return out


def available_backends() -> list[str]:
    """Names of the backends that work in this process, in ``"auto"``'s order of preference."""
    return [name for name in BACKENDS if probe(name).ok]


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in (*BACKENDS, "auto"):
        raise ValueError(
            f"{source}: unknown backend {name!r}; choose one of "
            f"{', '.join(repr(b) for b in (*BACKENDS, 'auto'))}"
        )
    if name != "auto":
        p = probe(name)
        if not p.ok:
            raise RuntimeError(f"{source}: backend {name!r} is not available: {p.reason}")
    return name


_current: str | None = None  # None: not chosen yet, read FUSED_POOL_BACKEND on first use


def get_backend() -> str:
    """The backend name in force (``"auto"`` unless set)."""
    global _current
    if _current is None:
        _current = _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")
    return _current


def set_backend(name: str) -> None:
    """Choose the backend for every following call: ``"auto"``, ``"triton"``, ``"cpp"`` or
    ``"torch"``. Raises if the name is unknown or that backend is not available here."""
    global _current
    _current = _check_name(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of ``set_backend``; restores the previous choice on exit."""
    global _current
    previous = get_backend()
    _current = _check_name(name, "use_backend")
    try:
        yield
    finally:
        _current = previous


def _runs_on(name: str, device: str) -> bool:
    p = probe(name)
    return p.ok and ("*" in p.devices or device in p.devices)


def resolve(device: torch.device) -> str:
    """The backend that runs ops on ``device`` under the current choice."""
    name = get_backend()
    dev = device.type
    if name == "auto":
        for candidate in BACKENDS:
            if candidate == "triton" and dev != "cuda":
                continue  # the interpreter is for testing, never picked silently
            if _runs_on(candidate, dev):
                return candidate
        raise RuntimeError(f"no fused_pool backend can run on {dev} tensors")
    if not _runs_on(name, dev):
        p = probe(name)
        raise RuntimeError(
            f"backend {name!r} cannot run on {dev} tensors (it runs on: "
            f"{', '.join(sorted(p.devices))}); use fused_pool.use_backend('auto') or move the "
            f"tensors"
        )
    return name


def ops(device: torch.device):
    """The ``torch.ops`` namespace of the backend that runs on ``device``."""
    return getattr(torch.ops, _TABLE[resolve(device)].namespace)
