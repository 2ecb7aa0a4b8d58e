"""examples/build_notebooks.py on the CPU: the notebooks build (unexecuted) as valid nbformat v4 with the
expected titles and compiling code cells; the committed notebooks match the script; --execute refuses
without a GPU; output trimming. Executing them needs an H100/H200 (see examples/README.md)."""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import nbformat
except ImportError:
    pytest.skip("nbformat is not installed (pip install -e '.[test]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "build_notebooks.py"
TITLES = {
    "01_quickstart": "cute-moe quickstart",
    "02_deepseek_v3_fp8": "A DeepSeek-V3-shaped MoE layer in fp8",
    "03_profile": "Where the time goes: `cute_moe.profile`",
}


def _script_module():
    spec = importlib.util.spec_from_file_location("build_notebooks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("notebooks")
    result = _run("--out-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_builds_the_three_notebooks_as_valid_nbformat_v4(built):
    assert sorted(p.stem for p in built.glob("*.ipynb")) == sorted(TITLES)
    for name, title in TITLES.items():
        nb = nbformat.read(built / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        assert nb.metadata.kernelspec.name == "python3"
        first = nb.cells[0]
        assert first.cell_type == "markdown" and first.source.splitlines()[0] == f"# {title}"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert len(code) >= 3
        assert all(c.outputs == [] and c.execution_count is None for c in code)  # not executed


@pytest.mark.parametrize("name", sorted(TITLES))
def test_code_cells_compile(built, name):
    nb = nbformat.read(built / f"{name}.ipynb", as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    for i, source in enumerate(sources):
        compile(source, f"{name}.ipynb code cell {i}", "exec")
    text = "\n".join(sources)
    assert "torch.manual_seed(0)" in text  # seeded, random data
    assert "torch.zeros(" not in text and "torch.ones(" not in text


def test_build_is_deterministic(built, tmp_path):
    assert _run("--out-dir", str(tmp_path), "--only", "03_profile").returncode == 0
    assert (tmp_path / "03_profile.ipynb").read_text() == (built / "03_profile.ipynb").read_text()


def test_committed_notebooks_match_the_script(built):
    stale = []
    for name in TITLES:
        committed = ROOT / "examples" / f"{name}.ipynb"
        if not committed.exists():
            stale.append(f"{name} (missing)")
            continue
        fresh = nbformat.read(built / f"{name}.ipynb", as_version=4)
        nb = nbformat.read(committed, as_version=4)
        if [(c.cell_type, c.get("id"), c.source) for c in nb.cells] != \
                [(c.cell_type, c.get("id"), c.source) for c in fresh.cells]:
            stale.append(name)
    assert not stale, (f"examples/*.ipynb out of date with examples/build_notebooks.py: {stale}; rebuild with "
                       "`python examples/build_notebooks.py --execute` on an H100/H200 (without --execute it "
                       "refreshes the sources and drops the outputs)")


def test_execute_refuses_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --execute would run")
    result = _run("--execute", "--out-dir", str(tmp_path))
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr
    assert not list(tmp_path.glob("*.ipynb"))


def test_strip_outputs_keeps_small_text_and_one_png():
    bn = _script_module()
    v4 = nbformat.v4
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
    cell = v4.new_code_cell("pass", execution_count=1)
    cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    cell.outputs = [
        v4.new_output("stream", name="stdout", text="".join(f"line {i}\n" for i in range(500))),
        v4.new_output("stream", name="stderr", text="\r 10%\r 50%\r100%\n"),
        v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}),
        v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}),
        v4.new_output("display_data", data={"text/html": "<b>big</b>" * 1000, "text/plain": "short"}),
    ]
    nb = v4.new_notebook(cells=[cell])
    bn.strip_outputs(nb)
    nbformat.validate(nb)
    out = nb.cells[0].outputs
    assert "execution" not in nb.cells[0].metadata
    assert len(out[0].text.splitlines()) <= bn.MAX_STREAM_LINES + 1 and "lines cut" in out[0].text
    assert out[0].text.startswith("line 0\n") and out[0].text.rstrip().endswith("line 499")
    assert out[1].text == "100%\n"
    assert [o.data for o in out[2:]] == [{"image/png": png}, {"text/plain": "short"}]
