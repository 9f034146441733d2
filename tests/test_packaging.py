"""Packaging and entry points: the two import packages, the console script, and README == CI."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rlhf_kernels_imports_without_the_engine():
    proc = _python("import sys, rlhf_kernels; "
                   "assert not [m for m in sys.modules if m.startswith('rlhf_engine')], 'pulled in rlhf_engine'")
    assert proc.returncode == 0, proc.stderr


def test_kernels_directory_does_not_shadow_huggingface_kernels():
    # From the repository root (cwd on sys.path, as under `python -m pytest`), our `kernels/` directory must
    # not stand in for Hugging Face's `kernels` package (a dependency of transformers >= 5.2x): transformers
    # sees it exactly when that distribution is installed, `import kernels` resolves to it (or to nothing),
    # and none of our modules is importable as `kernels.*`.
    code = (
        "import importlib, importlib.metadata, importlib.util, os\n"
        "from transformers.utils import is_kernels_available\n"
        "try:\n    importlib.metadata.version('kernels'); installed = True\n"
        "except importlib.metadata.PackageNotFoundError:\n    installed = False\n"
        "assert is_kernels_available() == installed, (is_kernels_available(), installed)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "ours = os.path.realpath('kernels') + os.sep\n"
        "assert spec is None or spec.origin is None or not os.path.realpath(spec.origin).startswith(ours), spec\n"
        "try:\n    importlib.import_module('kernels.reference')\nexcept ImportError:\n    pass\n"
        "else:\n    raise AssertionError('kernels.reference importable')\n"
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr


def test_console_script_lists_subcommands():
    exe = shutil.which("rlhf-engine")
    assert exe, "rlhf-engine is not on PATH: install the package (see README) before running the tests"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).stdout
    for cmd in ("config", "sft"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), out


def test_python_m_config_show_and_bad_key_exit_code():
    ok = subprocess.run([sys.executable, "-m", "rlhf_engine", "config", "show", "configs/sft_tiny.yaml", "optim.lr=0.5"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "lr: 0.5" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "rlhf_engine", "config", "show", "configs/sft_tiny.yaml", "optim.lrr=0.5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown key 'optim.lrr'; did you mean 'optim.lr'" in bad.stderr


def _readme_block(name: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- ci:{name} -->\s*```bash\n(.*?)```\s*<!-- /ci:{name} -->", text, re.S)
    assert block, f"README has no ci:{name} block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci/run").read_text()
    for name in ("main", "tests"):
        assert _readme_block(name), name
        assert f"ci:{name}" in ci  # .ci/run executes these very blocks, extracted from the README
    assert _readme_block("tests")[-1] == "python -m pytest -q"


def test_wheel_holds_both_packages_and_no_top_level_kernels(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("rlhf_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlhf_kernels/__init__.py" in names and "rlhf_engine/models/transformer.py" in names
    assert "rlhf_engine/__main__.py" in names and "rlhf_engine/py.typed" in names
    assert not [n for n in names if n.startswith(("kernels/", "tests/"))]
    # Installed from the wheel alone (no repository on sys.path), both packages import.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import rlhf_engine.models, rlhf_kernels; print(rlhf_engine.__file__, rlhf_kernels.__file__)"
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {[str(site)]!r}; " + code],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(str(site)) == 2


def test_triton_runs_interpreted_without_a_gpu():
    import os

    import torch

    if torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    else:
        assert os.environ["TRITON_INTERPRET"] == "1"
