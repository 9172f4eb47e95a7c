"""The benchmark command runs end to end (tiny shapes; speed is never asserted)."""

from __future__ import annotations

import csv
import json

import pytest

from fused_pool.bench import main as bench_main


def test_bench_writes_table_and_results(tmp_path, capsys):
    rc = bench_main(["--device", "cpu", "--shape", "2,8,4", "--ops", "masked_mean,layer_norm",
                     "--baselines", "eager,compile", "--budget", "0.01", "--repeats", "3",
                     "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "masked_mean" in out and "x compile" in out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    impls = {(r["op"], r["impl"], r["mode"]) for r in rows}
    for op in ("masked_mean", "layer_norm"):
        for mode in ("fwd", "fwdbwd"):
            assert {(op, "eager", mode), (op, "compile", mode), (op, "fp:torch", mode)} <= impls
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["max_error"]) < 1e-3
    meta = json.load(open(tmp_path / "results.json"))["meta"]
    assert meta["copy_gbps"] > 0 and meta["torch"]
    assert bench_main(["--markdown", str(tmp_path / "results.csv")]) == 0
    table = capsys.readouterr().out
    assert "fp:torch" in table and "| masked_mean | fwd |" in table


def test_bench_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rc = bench_main(["--device", "cpu", "--shape", "2,8,4", "--ops", "masked_max",
                     "--baselines", "eager", "--modes", "fwd", "--budget", "0.01",
                     "--repeats", "3", "--out", str(tmp_path), "--quiet", "--plot",
                     "--no-memory"])
    assert rc == 0
    for axis in ("L", "D"):
        png = tmp_path / f"bandwidth_vs_{axis}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_op():
    with pytest.raises(SystemExit, match="unknown op 'nope'"):
        bench_main(["--ops", "nope"])
