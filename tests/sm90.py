"""The one sm_90 compile check of the Triton kernels: Triton's compiler and ptxas (shipped with
Triton) build a kernel for an H100/H200 with no GPU, which catches what the interpreter lets
through (types, layouts, tuple arguments, register spills that fail a launch).

Each family's test module lists its kernels in a ``compile_all_for_sm90()`` function built on
``compile_for_sm90`` and runs it with ``run_in_fresh_process``: kernels must be JIT functions,
not the interpreter's, so the compile runs in a process without ``TRITON_INTERPRET``.

Arguments are specialized as Triton's JIT specializes the launches that really run: pointers
16-byte aligned, and the arguments named in ``unit`` equal to 1 (contiguous feature strides,
which the JIT turns into constants).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Exit code of a compile process whose Triton has another compiler API (the test skips).
_OTHER_API = 77


def compile_for_sm90(fn, types: dict, consts: dict, num_warps: int, *, default: str = "i32",
                     unit: tuple[str, ...] = (), tuples: int = 0) -> None:
    """Compile the JIT function ``fn`` for sm_90.

    ``types``: argument name -> Triton type (``"*bf16"``, ``"i64"``...); unnamed arguments get
    ``default``. ``consts``: constexpr values. ``unit``: arguments specialized to 1. With
    ``tuples = N``, the arguments whose type in ``types`` is a tuple marker ``("*bf16",)`` take
    N elements of it (Triton's tuple arguments, e.g. the N layers of the weighted-layer
    kernels); a name in ``unit`` that is a tuple argument becomes N constants 1.
    """
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs, consts = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        ty = types.get(name, default)
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(ty, tuple):
            if name in unit:
                sig[name] = ("constexpr",) * tuples
                consts.update({(i, j): 1 for j in range(tuples)})
            else:
                sig[name] = (ty[0],) * tuples
                if ty[0].startswith("*"):
                    attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(tuples)})
        elif name in unit:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = ty
            if ty.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def require_compiler_api() -> None:
    """Exit with the 'skip' code when this Triton's ``ASTSource`` takes no ``constexprs``."""
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        sys.exit(_OTHER_API)


def run_in_fresh_process(function: str) -> None:
    """Run ``tests.<module>.<function>()`` (``function`` as ``"test_pool.compile_all_for_sm90"``)
    in a new interpreter without ``TRITON_INTERPRET``; fail with its stderr, or skip when the
    installed Triton's compiler API differs."""
    pytest.importorskip("triton")
    module, name = function.rsplit(".", 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from tests.{module} import {name}; {name}()"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == _OTHER_API:
        pytest.skip("this Triton's compiler API differs (ASTSource without constexprs)")
    assert r.returncode == 0, r.stderr[-4000:]
