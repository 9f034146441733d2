"""The README's Python examples run as written: every ```python block of "Using it as a library", in
order, as one script, from a copy of the repository's configs (tiny models, nothing downloaded)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _library_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it as a library"):text.index("\n## ", text.index("## Using it as a library") + 5)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_readme_library_examples_run(tmp_path):
    blocks = _library_blocks()
    assert len(blocks) == 4
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(blocks) + "\nprint('README examples ran', result['step'], summary['steps'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "README examples ran 3 1" in proc.stdout
    assert (tmp_path / "runs" / "readme" / "hf" / "config.json").exists()
