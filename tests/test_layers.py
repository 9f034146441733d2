"""The package's layering, enforced: every import of ``rlhf_engine`` (module level and inside functions)
goes to the same layer or below, the import graph has no cycle, single stages do not import each other,
and an import inside a function says why it is there. The picture is in docs/architecture.md ("Layers").
"""

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_engine"

# Bottom to top. A module may import from its own layer or any layer below, never above.
LAYERS = [
    ("base", ["rlhf_engine", "rlhf_engine._C", "rlhf_engine.registry", "rlhf_engine.catalog", "rlhf_engine.faults"]),
    ("config", ["rlhf_engine.config"]),
    ("models, data", ["rlhf_engine.models", "rlhf_engine.data"]),
    ("algorithms", ["rlhf_engine.algorithms"]),
    ("parallel", ["rlhf_engine.parallel"]),
    ("runtime pieces", ["rlhf_engine.rewards", "rlhf_engine.labelers", "rlhf_engine.rollout", "rlhf_engine.trainer",
                        "rlhf_engine.optimizer", "rlhf_engine.report"]),
    ("stages", ["rlhf_engine.stages"]),
    ("entry points", ["rlhf_engine.cli", "rlhf_engine.__main__"]),
]
SINGLE_STAGES = {"rlhf_engine.stages.sft", "rlhf_engine.stages.reward", "rlhf_engine.stages.dpo", "rlhf_engine.stages.rl",
                 "rlhf_engine.stages.rlaif"}
COMPOSITE_STAGES = {"rlhf_engine.stages.pipeline", "rlhf_engine.stages.iterate", "rlhf_engine.stages.cai"}
STAGE_HELPERS = {"rlhf_engine.stages", "rlhf_engine.stages.common", "rlhf_engine.stages.probe"}
# Reasons an import may sit inside a function, as a comment on its line or the line above.
REASONS = ("cycle", "optional", "lazy")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def _resolve(target: str) -> str | None:
    """The engine module an import names (a name imported from a package resolves to its module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports(module: str) -> list[tuple[str, int, bool, list[str]]]:
    """(imported engine module, line, inside a function, names) for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            candidates = [f"{target}.{n}" for n in names] + [target]
        elif isinstance(node, ast.Import):
            names, candidates = [], [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            if c.startswith("rlhf_engine"):
                resolved = _resolve(c)
                if resolved and resolved != module:
                    found.append((resolved, node.lineno, id(node) in in_function, names))
                    break
        else:
            if id(node) in in_function:
                found.append(("<external>", node.lineno, True, names))
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_upward_import():
    bad = []
    for module in MODULES:
        for target, line, _, _ in imports(module):
            if target != "<external>" and layer_of(target) > layer_of(module):
                bad.append(f"{module}:{line} imports {target} ({LAYERS[layer_of(target)][0]} is above "
                           f"{LAYERS[layer_of(module)][0]})")
    assert not bad, "\n".join(bad)


def test_import_graph_has_no_cycle():
    graph = {m: {t for t, *_ in imports(m) if t != "<external>"} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]) if t in path else t)
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_single_stages_do_not_import_each_other():
    stages = {m for m in MODULES if m.startswith("rlhf_engine.stages")}
    assert stages == SINGLE_STAGES | COMPOSITE_STAGES | STAGE_HELPERS, "classify the new stage module here"
    for module in SINGLE_STAGES:
        for target, line, _, _ in imports(module):
            assert target not in SINGLE_STAGES | COMPOSITE_STAGES, f"{module}:{line} imports {target}"
    for module in COMPOSITE_STAGES:  # the composite stages may call the single stages' run_* only
        for target, line, _, names in imports(module):
            if target in SINGLE_STAGES:
                assert all(n.startswith("run_") for n in names), f"{module}:{line} takes {names} from {target}"


def test_imports_inside_functions_say_why():
    bad = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for _, line, inside, _ in imports(module):
            if inside:
                said = " ".join(lines[max(0, line - 2) : line]).lower()
                if not any(f"{r}" in said for r in REASONS):
                    bad.append(f"{module}:{line}: {lines[line - 1].strip()}")
    assert not bad, "imports inside functions need a comment naming the reason (cycle / optional / lazy):\n" + \
        "\n".join(bad)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The test can fail: a model module importing the trainer is reported."""
    fake = tmp_path / "rlhf_engine"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "trainer.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "bad.py").write_text("def f():\n    from ..trainer import Trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    monkeypatch.setattr(__import__(__name__), "MODULES", {_module_name(p): p for p in fake.rglob("*.py")})
    with pytest.raises(AssertionError, match="rlhf_engine.models.bad:2 imports rlhf_engine.trainer"):
        test_no_upward_import()
    with pytest.raises(AssertionError, match="cycle / optional / lazy"):
        test_imports_inside_functions_say_why()


def test_files_stay_at_600_lines_or_fewer():
    root = PACKAGE.parent
    long = [f"{p.relative_to(root)}: {n}" for p in [*PACKAGE.rglob("*.py"), *(root / "kernels").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long


def test_command_line_starts_without_torch():
    """``--help`` and ``config show`` import neither torch nor transformers (a fresh interpreter), so they
    answer at once; errors the CLI reports (faults.py) are torch-free for the same reason."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io; from rlhf_engine.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['config', 'show', 'configs/sft_tiny.yaml'])\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    root = PACKAGE.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
