"""fused_pool/_extension.py: cache folder, lock, CUDA home and failure messages of the first-use
build. Fast: nothing here compiles (scripts/ci_pip_install.sh tests a real first-use build)."""

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fused_pool import _extension as ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSED_POOL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ext.cache_root() == str(tmp_path / "xdg" / "fused_pool")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ext.cache_root() == str(tmp_path / "home" / ".cache" / "fused_pool")
    monkeypatch.setenv("FUSED_POOL_CACHE_DIR", str(tmp_path / "mine"))
    assert ext.cache_root() == str(tmp_path / "mine")


def _fake_csrc(root):
    (root / "cpu").mkdir(parents=True)
    (root / "a.cpp").write_text("int a;\n")
    (root / "common.h").write_text("#pragma once\n")
    (root / "cpu" / "b.cpp").write_text("int b;\n")
    return root


def test_sources_are_globbed_and_hashed(tmp_path):
    csrc = _fake_csrc(tmp_path / "csrc")
    assert [os.path.relpath(p, csrc) for p in ext.cpp_sources(str(csrc))] == [
        "a.cpp", os.path.join("cpu", "b.cpp")]
    before = ext.sources_hash(str(csrc))
    (csrc / "README.md").write_text("docs do not change the build\n")
    assert ext.sources_hash(str(csrc)) == before
    (csrc / "common.h").write_text("#pragma once\n#define X 1\n")  # a header does
    assert ext.sources_hash(str(csrc)) != before


def test_build_folder_names_torch_and_changes_with_flags(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("FUSED_POOL_CACHE_DIR", str(tmp_path))
    csrc = str(_fake_csrc(tmp_path / "csrc"))
    monkeypatch.setenv("FUSED_POOL_CPU_FLAGS", "")
    portable = ext.build_dir(csrc, ext.extension_options(csrc, []), cuda=False)
    assert os.path.dirname(portable) == str(tmp_path)
    name = os.path.basename(portable)
    assert torch.__version__.replace("+", "_") in name and "-cpu-" in name
    assert sys.implementation.cache_tag in name
    assert ext.build_dir(csrc, ext.extension_options(csrc, []), cuda=False) == portable
    monkeypatch.setenv("FUSED_POOL_CPU_FLAGS", "-march=x86-64-v2")
    assert ext.build_dir(csrc, ext.extension_options(csrc, []), cuda=False) != portable


def test_flags_are_the_ones_setup_py_used(monkeypatch):
    monkeypatch.delenv("FUSED_POOL_CPU_FLAGS", raising=False)
    csrc = os.path.join(ROOT, "csrc")
    options = ext.extension_options(csrc, [])
    cxx = options["extra_compile_args"]["cxx"]
    for flag in ("-O3", "-ffp-contract=off", "-march=native"):
        assert flag in cxx
    assert any(f.startswith("-std=c++") for f in cxx)
    assert "nvcc" not in options["extra_compile_args"]
    cuda = ext.extension_options(csrc, ["k.cu"])
    assert cuda["sources"][-1] == "k.cu" and "-lineinfo" in cuda["extra_compile_args"]["nvcc"]
    assert "--use_fast_math" not in cuda["extra_compile_args"]["nvcc"]


def test_a_checkout_finds_its_csrc():
    assert ext.source_dir() in (os.path.join(ROOT, "csrc"),
                                os.path.join(ROOT, "fused_pool", "_csrc"))


def test_cuda_home_behind_an_nvcc_wrapper(monkeypatch, tmp_path):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin").mkdir()
    wrappers = tmp_path / "local" / "bin"
    wrappers.mkdir(parents=True)
    nvcc = wrappers / "nvcc"  # like /usr/local/bin/nvcc: a script, so its grandparent is no CUDA
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo '#$ _NVVM_BRANCH_=nvvm' >&2
        echo '#$ TOP={toolkit}/bin/..' >&2
        """))
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    assert ext.find_cuda_home() == str(toolkit.resolve())
    link = tmp_path / "bin"  # a symlink to the real nvcc is followed without running it
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    link.mkdir()
    (link / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(link))
    assert ext.find_cuda_home() == str(toolkit.resolve())
    monkeypatch.setenv("CUDA_HOME", "/opt/my-cuda")  # an explicit CUDA_HOME always wins
    assert ext.find_cuda_home() == "/opt/my-cuda"


@pytest.mark.parametrize("log, words", [
    ("/bin/sh: 1: c++: not found\nninja: build stopped", ("no C++ compiler", "g++")),
    ("fatal error: Python.h: No such file or directory", ("Python.h", "python3-dev")),
    ("/usr/bin/ld: cannot find -lcudart: No such file or directory", ("CUDA_HOME=/usr/local",
                                                                     "FUSED_POOL_CUDA=0")),
    ("fatal error: cusparse.h: No such file or directory", ("cusparse.h",)),
    ("c++: error: unrecognized command-line option '-mfoo'", ("FUSED_POOL_CPU_FLAGS",)),
    ("pool_cpu.cpp:10:3: error: 'foo' was not declared", ("compiler or linker", "report")),
    ("RuntimeError: Ninja is required to load C++ extensions", ("pip install ninja",)),
])
def test_a_failed_build_names_its_cause_and_fix(log, words):
    cause, fix = ext.diagnose(log, cuda_home="/usr/local")
    for word in words:
        assert word in cause + " " + fix


def test_a_missing_compiler_is_reported_before_building(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    why = ext._compiler_missing()
    assert "no-such-c++-compiler" in why and "python -m fused_pool build" in why


def test_the_build_lock_makes_a_second_process_wait(tmp_path, capsys):
    lock = str(tmp_path / "b.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import fcntl, sys, time
            f = open({lock!r}, "a+")
            fcntl.flock(f, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.readline()
            """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        entered = threading.Event()

        def take():
            with ext.build_lock(lock):
                entered.set()

        thread = threading.Thread(target=take)
        thread.start()
        time.sleep(0.3)
        assert not entered.is_set(), "the lock did not keep out a second process"
        holder.stdin.write("\n")  # the holder exits: the OS releases its lock
        holder.stdin.flush()
        thread.join(10)
        assert entered.is_set()
    finally:
        holder.kill()
        holder.wait()
    assert "another process is building" in capsys.readouterr().err


def test_a_recorded_failure_is_reported_without_compiling_again(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSED_POOL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FUSED_POOL_CPU_FLAGS", "")
    csrc = str(_fake_csrc(tmp_path / "csrc"))
    where = ext.build_dir(csrc, ext.extension_options(csrc, []), cuda=False)
    os.makedirs(where)
    with open(os.path.join(where, ext.FAILED_FILE), "w") as f:
        f.write('{"cause": "no C++ compiler was found", "fix": "install one"}')

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiling)
    ok, why = ext._build(csrc, [], allow_build=True, retry_failed=False, verbose=False)
    assert not ok
    assert "no C++ compiler was found" in why and "python -m fused_pool build" in why
    ok, why = ext._build(csrc, [], allow_build=False, retry_failed=True, verbose=False)
    assert not ok and "python -m fused_pool build" in why and "not built" in why


def test_an_unwritable_cache_folder_says_how_to_choose_another(monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("FUSED_POOL_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    csrc = str(_fake_csrc(tmp_path / "csrc"))
    monkeypatch.setattr(ext, "_compiler_missing", lambda: None)
    ok, why = ext._build(csrc, [], allow_build=True, retry_failed=False, verbose=False)
    assert not ok and "FUSED_POOL_CACHE_DIR" in why


def test_loading_twice_never_registers_the_operators_twice():
    import fused_pool as fp

    ok, _ = fp.backend_status()["cpp"]
    if not ok:
        pytest.skip("the cpp backend is not available here")
    ok, why = ext.load()  # a second copy would abort the process
    assert ok and "loaded already" in why
