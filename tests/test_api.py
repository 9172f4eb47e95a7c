"""Errors, backend selection, torch.library registration, torch.compile and property tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_pool as fp
from fused_pool import _dispatch
from fused_pool._schema import FAMILIES, SCHEMAS
from fused_pool.backends import BACKENDS

from . import oracle
from .helpers import leaf, make_mask, pack, rand

# ----------------------------------------------------------------------------------------------
# Bad input: a clear Python exception naming the argument, before any kernel runs
# ----------------------------------------------------------------------------------------------

X = torch.randn(2, 3, 4)
M = torch.ones(2, 3, dtype=torch.bool)
CU = torch.tensor([0, 2, 5], dtype=torch.int32)
XP = torch.randn(5, 4)

BAD = [
    ("int x", lambda: fp.masked_mean(X.long(), M), TypeError, "x must be a floating"),
    ("not a tensor", lambda: fp.masked_max([[1.0]], None), TypeError, "x must be a torch.Tensor"),
    ("rank", lambda: fp.masked_mean(X[0]), ValueError, r"\[B, L, D\] \(3 dims\).*\(3, 4\)"),
    ("rank 4", lambda: fp.masked_min(X[None]), ValueError, r"got shape \(1, 2, 3, 4\)"),
    ("mask shape", lambda: fp.masked_mean(X, M[:, :2]), ValueError,
     r"mask must have shape \[B, L\] = \(2, 3\).*got \(2, 2\)"),
    ("mask device", lambda: fp.masked_mean(X, M.to("meta")), ValueError, "mask is on meta"),
    ("mask complex", lambda: fp.masked_mean(X, M.to(torch.complex64)), TypeError, "mask"),
    ("mask and cu", lambda: fp.masked_mean(XP, M, cu_seqlens=CU), ValueError, "not both"),
    ("cu dtype", lambda: fp.masked_mean(XP, cu_seqlens=CU.float()), TypeError,
     "cu_seqlens must be int32 or int64"),
    ("cu rank", lambda: fp.masked_mean(XP, cu_seqlens=CU[None]), ValueError, r"1-D \[B \+ 1\]"),
    ("cu empty", lambda: fp.masked_mean(XP, cu_seqlens=CU[:0]), ValueError, "at least one"),
    ("cu start", lambda: fp.masked_mean(XP, cu_seqlens=torch.tensor([1, 5])), ValueError,
     "start at 0"),
    ("cu end", lambda: fp.masked_mean(XP, cu_seqlens=torch.tensor([0, 4])), ValueError,
     r"end at T = x.shape\[0\] = 5"),
    ("cu order", lambda: fp.masked_mean(XP, cu_seqlens=torch.tensor([0, 3, 2, 5])), ValueError,
     r"non-decreasing.*cu_seqlens\[2\] = 2"),
    ("cu with 3-D x", lambda: fp.masked_mean(X, cu_seqlens=CU), ValueError, r"packed \[T, D\]"),
    ("k < 1", lambda: fp.masked_kmax(X, M, 0), ValueError, "k must be at least 1"),
    ("k > L", lambda: fp.masked_kmax(X, M, 4), ValueError, "at most L = 3"),
    ("k > L = 0", lambda: fp.masked_kmax(X[:, :0], M[:, :0], 1), ValueError, "at most L = 0"),
    ("k type", lambda: fp.masked_kmax(X, M, 1.5), TypeError, "k must be an int"),
    ("reduce", lambda: fp.masked_kmax(X, M, 1, reduce="sum"), ValueError, "reduce"),
    ("heads", lambda: fp.attention_pool(X, torch.randn(2, 3, 3), M), ValueError,
     "D = 4 must be divisible by the number of heads H = 3"),
    ("scores shape", lambda: fp.attention_pool(X, torch.randn(2, 4), M), ValueError,
     r"scores must be \[B, L\] or \[B, L, H\]"),
    ("scores int", lambda: fp.attention_pool(X, torch.ones(2, 3, dtype=torch.long)), TypeError,
     "scores must be a floating"),
    ("packed scores", lambda: fp.attention_pool(XP, torch.randn(4), cu_seqlens=CU), ValueError,
     r"\[T\] or \[T, H\]"),
    ("weights length", lambda: fp.weighted_layer_pool([X, X, X], torch.ones(2)), ValueError,
     r"one entry per layer in hidden_states\[0:\] \(3\)"),
    ("layer mismatch", lambda: fp.weighted_layer_pool([X, X[:, :2]], torch.ones(2)), ValueError,
     r"hidden_states\[1\].*all layers must match"),
    ("layer dtype", lambda: fp.weighted_layer_pool([X, X.double()], torch.ones(2)), ValueError,
     "all layers must match"),
    ("layer_start", lambda: fp.weighted_layer_pool([X, X], torch.ones(1), layer_start=2),
     ValueError, r"layer_start = 2 must be in \[0, 2\)"),
    ("hidden_states type", lambda: fp.weighted_layer_pool(3, torch.ones(1)), TypeError,
     "hidden_states must be a sequence"),
    ("stacked rank", lambda: fp.weighted_layer_mean(X, torch.ones(2)), ValueError,
     r"\[N, B, L, D\]"),
    ("layer mask", lambda: fp.weighted_layer_mean([X, X], torch.ones(2), M[:1]), ValueError,
     "mask must have shape"),
    ("normalized_shape", lambda: fp.layer_norm(X, (3,)), ValueError,
     r"normalized_shape \[3\] must match the trailing dims of x.*\(2, 3, 4\)"),
    ("norm weight", lambda: fp.layer_norm(X, 4, torch.ones(3)), ValueError,
     r"weight must have shape \(4,\), got \(3,\)"),
    ("rms weight dtype", lambda: fp.rms_norm(X, 4, torch.ones(4, dtype=torch.long)), TypeError,
     "weight must be a floating"),
    ("eps", lambda: fp.layer_norm(X, 4, eps=-1.0), ValueError, "eps must be a non-negative"),
    ("residual shape", lambda: fp.add_layer_norm(X, X[:, :2], 4), ValueError,
     r"add_layer_norm: residual must have the shape and dtype of x.*\(2, 2, 4\).*\(2, 3, 4\)"),
    ("residual dtype", lambda: fp.add_rms_norm(X, X.double(), 4), ValueError,
     r"add_rms_norm: residual must have the shape and dtype of x, got residual torch.float64"),
    ("residual int", lambda: fp.add_layer_norm(X, X.long(), 4), TypeError,
     "residual must be a floating"),
    ("residual type", lambda: fp.add_layer_norm(X, 1.0, 4), TypeError,
     "residual must be a torch.Tensor"),
    ("residual device", lambda: fp.add_layer_norm(X, X.to("meta"), 4), ValueError,
     "residual is on meta"),
    ("add x int", lambda: fp.add_rms_norm(X.long(), X.long(), 4), TypeError,
     "add_rms_norm: x must be a floating"),
    ("add normalized_shape", lambda: fp.add_layer_norm(X, X, (3,)), ValueError,
     r"normalized_shape \[3\] must match the trailing dims of x"),
    ("add weight", lambda: fp.add_layer_norm(X, X, 4, None, torch.ones(3)), ValueError,
     r"bias must have shape \(4,\), got \(3,\)"),
    ("add eps", lambda: fp.add_rms_norm(X, X, 4, eps=-1.0), ValueError, "eps must be"),
    ("instance rank", lambda: fp.instance_norm(X[0]), ValueError, r"\[B, C, \*\]"),
    ("instance spatial", lambda: fp.instance_norm(X[..., :1]), ValueError,
     "more than 1 spatial element"),
    ("masked instance weight", lambda: fp.masked_instance_norm(X, M, torch.ones(3)), ValueError,
     r"weight must have shape \(4,\)"),
]


@pytest.mark.parametrize("call,exc,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_clear_errors(tgt, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_error_messages_name_the_function():
    with pytest.raises(ValueError, match="^masked_kmax: "):
        fp.masked_kmax(X, M, 9)
    with pytest.raises(ValueError, match="^weighted_layer_mean: "):
        fp.weighted_layer_mean([X], torch.ones(2))


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------

def test_available_backends_and_status():
    names = fp.available_backends()
    assert "torch" in names
    status = fp.backend_status()
    assert set(status) == {"triton", "cpp", "torch"}
    for name, (ok, why) in status.items():
        assert ok == (name in names) and why, f"{name}: a reason or device list is reported"


@pytest.mark.skipif(os.environ.get("FUSED_POOL_REQUIRE_EXT") != "1",
                    reason="only where the build must include the C++ extension (CI)")
def test_cpp_backend_is_built():
    ok, why = fp.backend_status()["cpp"]
    assert ok, why


@pytest.mark.skipif(os.environ.get("FUSED_POOL_REQUIRE_TRITON") != "1",
                    reason="only where Triton must be installed (CI runs its interpreter)")
def test_triton_backend_is_available():
    ok, why = fp.backend_status()["triton"]
    assert ok, why


def test_triton_backend_has_no_placeholders():
    """Every "triton" operator is a Triton launcher, never the torch reference in disguise."""
    try:
        from fused_pool.backends import triton_backend
    except ImportError as exc:
        pytest.skip(f"Triton kernels not importable here: {exc}")
    from fused_pool.backends import reference

    borrowed = [n for n, f in triton_backend.IMPLEMENTATIONS.items()
                if f is reference.IMPLEMENTATIONS[n]
                or f.__module__.startswith(reference.__name__)]
    assert not borrowed, f"these triton ops delegate to the reference: {borrowed}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_family_module_implements_exactly_its_family(backend):
    """The layout rule: the ops of family F are implemented in ``backends/<backend>/F.py``
    (``_schema.FAMILIES``), each module's table holds exactly its family's ops, and the
    families cover every schema."""
    import importlib

    try:
        package = importlib.import_module(BACKENDS[backend].module)
    except ImportError as exc:
        pytest.skip(f"{backend} kernels not importable here: {exc}")
    assert sorted(n for ops in FAMILIES.values() for n in ops) == sorted(SCHEMAS)
    for family, names in FAMILIES.items():
        module = importlib.import_module(f"{package.__name__}.{family}")
        assert sorted(module.IMPLEMENTATIONS) == sorted(names), f"{backend}/{family}.py"
        for name, fn in module.IMPLEMENTATIONS.items():
            assert fn.__module__ == module.__name__, f"{name} is not defined in {family}.py"
    assert sorted(package.IMPLEMENTATIONS) == sorted(SCHEMAS)


def test_set_and_use_backend():
    before = fp.get_backend()
    with fp.use_backend("torch"):
        assert fp.get_backend() == "torch"
        assert _dispatch.resolve(torch.device("cpu")) == "torch"
    assert fp.get_backend() == before
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        fp.set_backend("cuda")
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with fp.use_backend("fast"):
            pass
    assert fp.get_backend() == before


@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_forcing_an_unavailable_backend_names_what_is_missing(name):
    ok, reason = fp.backend_status()[name]
    if ok:
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: .+"):
        fp.set_backend(name)
    assert reason in str(pytest.raises(RuntimeError, fp.set_backend, name).value)


def test_auto_never_picks_the_triton_interpreter_for_cpu():
    with fp.use_backend("auto"):
        assert _dispatch.resolve(torch.device("cpu")) in ("cpp", "torch")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable_sets_the_default():
    r = _run_python("import fused_pool as fp; print(fp.get_backend())",
                    FUSED_POOL_BACKEND="torch")
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr
    r = _run_python("import fused_pool as fp, torch; fp.masked_mean(torch.ones(1, 1, 1))",
                    FUSED_POOL_BACKEND="bogus")
    assert r.returncode != 0 and "$FUSED_POOL_BACKEND: unknown backend 'bogus'" in r.stderr


def test_cli_info():
    r = subprocess.run([sys.executable, "-m", "fused_pool", "info"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for word in ("torch", "triton", "cpp", "backend", "device"):
        assert word in r.stdout


# ----------------------------------------------------------------------------------------------
# torch.library: opcheck on every operator of the backend under test
# ----------------------------------------------------------------------------------------------

def _op_samples(dev):
    """(op name, args) covering every forward operator in both layouts and with grads."""
    x = rand(3, 5, 6, device=dev, requires_grad=True)
    mask = make_mask(3, 5, dev, kind="prefix")
    xp, cu = pack(x.detach(), mask)
    xp.requires_grad_(True)
    s = rand(3, 5, 2, device=dev, requires_grad=True)
    sp = rand(xp.shape[0], 2, device=dev, requires_grad=True)
    layers = [rand(3, 5, 6, device=dev, requires_grad=True) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 0.5], device=dev, requires_grad=True)
    nw, nb = rand(6, device=dev, requires_grad=True), rand(6, device=dev, requires_grad=True)
    res = rand(3, 5, 6, device=dev, requires_grad=True)
    return [
        ("masked_mean", (x, mask, None)), ("masked_mean", (xp, None, cu)),
        ("masked_extremum", (x, mask, None, True)), ("masked_extremum", (xp, None, cu, False)),
        ("masked_kmax", (x, mask, None, 2)), ("masked_kmax", (xp, None, cu, 3)),
        ("masked_mean_max", (x, mask, None)), ("masked_mean_max", (xp, None, cu)),
        ("attention_pool", (x, s, mask, None)), ("attention_pool", (xp, sp, None, cu)),
        ("weighted_layer_pool", (layers, w)), ("weighted_layer_mean", (layers, w, mask)),
        ("layer_norm", (x, 1, nw, nb, 1e-5)), ("layer_norm", (x, 2, None, None, 1e-5)),
        ("rms_norm", (x, 1, nw, 1e-6)), ("instance_norm", (x, None, None, 1e-5)),
        ("add_layer_norm", (x, res, 1, nw, nb, 1e-5, False)),
        ("add_layer_norm", (x, res.detach().transpose(0, 1).contiguous().transpose(0, 1), 2,
                            None, None, 1e-5, True)),
        ("add_rms_norm", (x, res, 1, nw, 1e-6, True)),
        ("add_rms_norm", (x, res, 1, None, 1e-6, False)),
        ("instance_norm", (x.transpose(1, 2), nw, nb, 1e-5)),
        ("masked_instance_norm", (x, mask, None, nw, nb, 1e-5)),
        ("masked_instance_norm", (xp, None, cu, None, nb, 1e-5)),
    ]


def test_cpp_schemas_match_the_python_contract():
    """csrc/fused_pool.cpp spells out the schemas of fused_pool/_schema.py; they must agree."""
    if not fp.backend_status()["cpp"][0]:
        pytest.skip("the C++ extension is not built")
    from fused_pool._schema import SCHEMAS

    ops = torch.ops.fused_pool_cpp
    for name, schema in SCHEMAS.items():
        want = str(torch._C.parse_schema(f"fused_pool_cpp::{name}{schema}"))
        assert str(getattr(ops, name).default._schema) == want


def test_opcheck_every_forward_op(tgt):
    ops = getattr(torch.ops, BACKENDS[tgt.backend].namespace)
    seen = set()
    for name, args in _op_samples(tgt.device):
        torch.library.opcheck(getattr(ops, name), args)
        seen.add(name)
    from fused_pool._schema import FORWARD_OPS
    assert seen == set(FORWARD_OPS)


def test_opcheck_backward_ops(tgt):
    ops = getattr(torch.ops, BACKENDS[tgt.backend].namespace)
    dev = tgt.device
    mask = make_mask(3, 5, dev)
    g = rand(3, 6, device=dev)
    x = rand(3, 5, 6, device=dev)
    idx = ops.masked_extremum(x, mask, None, True)[1]
    torch.library.opcheck(ops.masked_mean_backward, (g, mask, None, 5))
    torch.library.opcheck(ops.index_pool_backward, (g[:, None], idx[:, None], None, 5))
    torch.library.opcheck(ops.masked_mean_max_backward, (rand(3, 12, device=dev), idx, mask,
                                                         None, 5))
    y, mean, rstd = ops.layer_norm(x, 1, None, None, 1e-5)
    torch.library.opcheck(ops.layer_norm_backward, (y, x, 1, None, None, mean, rstd))
    r, nw = rand(3, 5, 6, device=dev), rand(6, device=dev)
    y, _, mean, rstd = ops.add_layer_norm(x, r, 1, nw, None, 1e-5, False)
    torch.library.opcheck(ops.add_layer_norm_backward, (y, x, x, r, 1, nw, None, mean, rstd))
    y, _, rstd = ops.add_rms_norm(x, r, 1, None, 1e-6, False)
    torch.library.opcheck(ops.add_rms_norm_backward, (y, None, x, r, 1, None, rstd))


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, same values and gradients
# ----------------------------------------------------------------------------------------------

def _compile_cases(dev):
    mask = make_mask(2, 5, dev)
    s = rand(2, 5, 3, device=dev)
    hs = [rand(2, 5, 6, device=dev) for _ in range(3)]
    w = torch.tensor([1.0, 2.0, 3.0], device=dev)
    res = rand(2, 5, 6, device=dev)
    return {
        "mean": lambda x: fp.masked_mean(x, mask),
        "max": lambda x: fp.masked_max(x, mask),
        "min_idx": lambda x: fp.masked_min(x, mask, return_indices=True)[0],
        "kmax": lambda x: fp.masked_kmax(x, mask, 2),
        "kmax_mean": lambda x: fp.masked_kmax(x, mask, 3, reduce="mean"),
        "mean_max": lambda x: fp.masked_mean_max(x, mask),
        "attention": lambda x: fp.attention_pool(x, s, mask),
        "layers": lambda x: fp.weighted_layer_pool([x, *hs[1:]], w),
        "layer_mean": lambda x: fp.weighted_layer_mean([x, *hs[1:]], w, mask),
        "layer_norm": lambda x: fp.layer_norm(x, 6),
        "rms_norm": lambda x: fp.rms_norm(x, 6),
        "add_layer_norm": lambda x: fp.add_layer_norm(x, res, 6),
        "add_rms_norm_sum": lambda x: sum(fp.add_rms_norm(res, x, 6, return_residual=True)),
        "instance_norm": lambda x: fp.instance_norm(x),
        "masked_instance_norm": lambda x: fp.masked_instance_norm(x, mask),
    }


@pytest.mark.parametrize("case", list(_compile_cases("cpu")))
def test_torch_compile_fullgraph(tgt, case):
    torch._dynamo.reset()
    fn = _compile_cases(tgt.device)[case]
    x = rand(2, 5, 6, device=tgt.device)
    xe, xc = leaf(x), leaf(x)
    want = fn(xe)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(xc)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), xc)[0],
                               torch.autograd.grad(want.sum(), xe)[0])


def test_cuda_graph_capture(tgt):
    """No host synchronization inside an op: every forward and backward can be captured in a
    CUDA graph and replayed on new data in place."""
    if tgt.device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    dev = tgt.device
    xl = leaf(rand(2, 5, 6, device=dev))  # the shape _compile_cases' masks and layers expect
    calls = _compile_cases(dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls.values():  # warm up: Triton compiles, allocator pools fill
            torch.autograd.grad(fn(xl).sum(), xl)
    torch.cuda.current_stream().wait_stream(stream)
    for name, fn in calls.items():
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(xl)
            (gx,) = torch.autograd.grad(out.sum(), xl)
        new = rand(2, 5, 6, device=dev)
        with torch.no_grad():
            xl.copy_(new)
        graph.replay()
        xn = leaf(new)
        want = fn(xn)
        torch.testing.assert_close(out, want, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), xn)[0],
                                   msg=lambda m, n=name: f"{n} grad: {m}")


def test_torch_compile_inductor_and_dynamic_shapes(tgt):
    """Inductor compiles around the ops (fake kernels give it shapes); one dynamic-shape graph
    serves several sizes."""
    torch._dynamo.reset()

    def head(x, mask, w):
        return fp.layer_norm(fp.masked_mean_max(x, mask), x.shape[-1] * 2, w) * 2

    compiled = torch.compile(head, fullgraph=True, dynamic=True)
    for b, length in ((2, 5), (3, 7)):
        x = leaf(rand(b, length, 4, device=tgt.device))
        w = leaf(rand(8, device=tgt.device))
        mask = make_mask(b, length, tgt.device)
        got = compiled(x, mask, w)
        x2, w2 = leaf(x), leaf(w)
        want = head(x2, mask, w2)
        torch.testing.assert_close(got, want)
        g = torch.autograd.grad(got.sum(), [x, w])
        g2 = torch.autograd.grad(want.sum(), [x2, w2])
        for a, b_ in zip(g, g2):
            torch.testing.assert_close(a, b_)


# ----------------------------------------------------------------------------------------------
# Hypothesis: random shapes and masks against the oracle
# ----------------------------------------------------------------------------------------------

@st.composite
def _pool_case(draw):
    b = draw(st.integers(0, 4))
    length = draw(st.integers(1, 6))
    d = draw(st.integers(0, 9))
    bits = draw(st.lists(st.booleans(), min_size=b * length, max_size=b * length))
    values = draw(st.sampled_from(["normal", "ties", "signs"]))
    return b, length, d, bits, values


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_pool_case())
def test_property_pools_match_oracle(tgt, case):
    b, length, d, bits, values = case
    dev = tgt.device
    mask = torch.tensor(bits, dtype=torch.bool).reshape(b, length).to(dev)
    if values == "ties":
        x = torch.randint(-2, 3, (b, length, d)).double().to(dev)
    elif values == "signs":
        x = torch.randn(b, length, d, dtype=torch.float64).sign().to(dev) * 1e-300
    else:
        x = rand(b, length, d, dtype=torch.float64, device=dev)
    torch.testing.assert_close(fp.masked_mean(x, mask), oracle.mean(x, mask))
    for largest, fn in ((True, fp.masked_max), (False, fp.masked_min)):
        v, i = fn(x, mask, return_indices=True)
        rv, ri = oracle.extremum(x, mask, largest=largest)
        assert torch.equal(v, rv) and torch.equal(i, ri)
    k = min(2, length)
    v, ri = fp.masked_kmax(x, mask, k), oracle.kmax(x, mask, k=k)
    assert torch.equal(v, ri[0])
    torch.testing.assert_close(fp.masked_mean_max(x, mask), oracle.mean_max(x, mask))
    s = rand(b, length, device=dev, dtype=torch.float64)
    torch.testing.assert_close(fp.attention_pool(x, s, mask), oracle.attention(x, s, mask))


def test_first_call_may_be_inside_torch_compile():
    """Backends are probed at import, so the very first call can happen while tracing."""
    code = ("import torch, fused_pool as fp\n"
            "f = torch.compile(lambda x: fp.masked_max(x), fullgraph=True, backend='eager')\n"
            "x = torch.randn(2, 3, 4)\n"
            "assert torch.equal(f(x), x.amax(1))\n")
    r = _run_python(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cpu_output_cache_can_be_disabled():
    if not fp.backend_status()["cpp"][0]:
        pytest.skip("the C++ extension is not built")
    code = ("import torch, fused_pool as fp\n"
            "x = torch.randn(4, 1024, 1024, requires_grad=True)\n"
            "with fp.use_backend('cpp'):\n"
            "    for _ in range(2):\n"
            "        (g,) = torch.autograd.grad(fp.masked_mean(x).sum(), x)\n"
            "        assert torch.allclose(g, torch.full_like(g, 1 / 1024))\n")
    r = _run_python(code, FUSED_POOL_CPU_CACHE_MB="0")
    assert r.returncode == 0, r.stderr[-2000:]
