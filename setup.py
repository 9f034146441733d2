"""Build script for the parts pyproject.toml cannot express: the pybind11 extension rlhf_engine._C.

Every C++ source under csrc/ is compiled into one extension module, `rlhf_engine._C` (pure C++, no
CUDA and no torch headers, so it builds on any machine with a C++17 compiler). Metadata and
dependencies live in pyproject.toml.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))


def extensions():
    if not SOURCES:
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError as err:  # only outside an isolated build, where pyproject's requires apply
        raise SystemExit("building rlhf_engine._C needs pybind11: pip install pybind11") from err
    compiler = os.environ.get("CXX", "").split()[:1] or ["c++"]
    if not any(shutil.which(c) for c in (*compiler, "c++", "g++", "clang++")):
        raise SystemExit("building rlhf_engine._C needs a C++17 compiler and none was found (tried $CXX, c++, "
                         "g++, clang++): install one, e.g. `apt install g++` or `xcode-select --install`")
    return [Pybind11Extension("rlhf_engine._C", SOURCES, cxx_std=17, extra_compile_args=["-O3"])]


setup(ext_modules=extensions())
