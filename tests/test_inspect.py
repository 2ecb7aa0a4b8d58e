"""CPU-only: every shipped kernel cross-compiles for sm_90a and its SASS is on the fast path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SASS_KEYS = {"HGMMA", "QGMMA", "UTMALDG", "UTMASTG", "LDL", "STL"}
H100_MAX_SMEM = 227 * 1024


@pytest.fixture(scope="module")
def report():
    done = subprocess.run([sys.executable, "-m", "cute_moe.inspect", "--arch", "sm_90a", "--json"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_schema(report):
    assert set(report) == {"kernels"} and report["kernels"]
    for k in report["kernels"]:
        assert {"name", "arch", "dtype", "compiled", "registers", "smem_bytes", "sass"} <= set(k)
        assert k["arch"] == "sm_90a" and k["dtype"] in ("bf16", "fp8")
        assert set(k["sass"]) == SASS_KEYS and all(isinstance(v, int) for v in k["sass"].values())


def test_every_kernel_on_the_fast_path(report):
    for k in report["kernels"]:
        assert k["compiled"], k
        mma = "HGMMA" if k["dtype"] == "bf16" else "QGMMA"
        assert k["sass"][mma] > 0, (k["name"], "no tensor-core WGMMA in SASS")
        assert k["sass"]["UTMALDG"] > 0 and k["sass"]["UTMASTG"] > 0, (k["name"], "no TMA loads/stores")
        assert k["sass"]["LDL"] == 0 and k["sass"]["STL"] == 0, (k["name"], "local-memory spills")
        assert 0 < k["registers"] <= 255 and 0 < k["smem_bytes"] <= H100_MAX_SMEM, k


def test_inspect_rejects_unknown_arch():
    done = subprocess.run([sys.executable, "-m", "cute_moe.inspect", "--arch", "sm_75"], capture_output=True, text=True)
    assert done.returncode != 0 and "invalid choice" in done.stderr
