"""perf.common result files (the timing helpers need a GPU and are exercised by the benchmarks)."""

from __future__ import annotations

import json

import pytest

from perf import common


def test_write_results(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "INDEX", tmp_path / "README.md")
    rows = [{"tokens": 1, "ms": 0.123456, "note": None}, {"tokens": 8, "ms": 2.0, "note": "x"}]
    plotted = []
    paths = common.write_results("demo", rows, {"title": "Demo result"}, md_columns=["tokens", "ms"],
                                 plot=lambda ax, r: plotted.append(len(r)))
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["rows"] == rows and data["meta"] == {"title": "Demo result"}
    assert {"card", "date", "commit", "dirty", "torch", "cutlass_dsl"} <= set(data["stamp"])
    md = (tmp_path / "demo.md").read_text().splitlines()
    assert md[0] == "# Demo result" and data["stamp"]["date"] in md[2] and data["stamp"]["commit"] in md[2]
    assert md[4:] == ["| tokens | ms |", "|---|---|", "| 1 | 0.1235 |", "| 8 | 2 |"]
    assert paths[:2] == [tmp_path / "demo.json", tmp_path / "demo.md"]
    if len(paths) == 3:
        assert plotted == [2] and paths[2].exists()
    common.write_results("demo", rows, {"title": "Demo again"}, md_columns=["tokens"])
    index = (tmp_path / "README.md").read_text()
    assert index.count("- [demo](demo.md):") == 1 and "Demo again" in index


def test_commit_falls_back_to_env(monkeypatch):
    monkeypatch.setattr(common, "_git", lambda *args: None)
    monkeypatch.setenv("CUTE_MOE_COMMIT", "abc1234")
    stamp = common.device_stamp()
    assert stamp["commit"] == "abc1234" and stamp["dirty"] is None


def test_bench_reference_refuses_without_cuda(monkeypatch):
    from perf import bench_reference

    monkeypatch.setattr(bench_reference.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_reference.main()


@pytest.mark.parametrize("module", ["bench_grouped_gemm", "bench_grouped_gemm_fp8", "bench_moe", "bench_host_overhead",
                                    "ncu_fp8_gemm"])
def test_sm90_scripts_import_and_refuse_without_a_hopper(monkeypatch, module):
    """Every sm90 perf script imports on a CPU machine and exits cleanly (status 2) without an sm_90 GPU."""
    import importlib

    mod = importlib.import_module(f"perf.sm90.{module}")
    monkeypatch.setattr(mod.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", [module])
    try:
        rc = mod.main([]) if "argv" in mod.main.__code__.co_varnames else mod.main()
    except SystemExit as ex:
        rc = ex.code if isinstance(ex.code, int) else 2
    assert rc == 2


def test_interleaved_ms_times_in_turn_and_takes_medians(monkeypatch):
    calls = []
    fake = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}

    def bench_ms(fn, **kw):
        calls.append((fn(), kw))
        return next(fake[calls[-1][0]])

    monkeypatch.setattr(common, "bench_ms", bench_ms)
    ms = common.interleaved_ms({"a": lambda: "a", "b": lambda: "b"}, rounds=3, graph=True)
    assert [c[0] for c in calls] == ["a", "b"] * 3  # round-robin, not all of one then the other
    assert all(c[1] == {"graph": True} for c in calls)
    assert ms == {"a": 3.0, "b": 4.0}
