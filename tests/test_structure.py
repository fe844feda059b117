"""The package's structure holds: no import cycle, the oracle stays an oracle, the CLI's help needs no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "deepforcing_kernels"
# modules allowed to import the oracle (deepforcing_kernels/reference/): the registry's "reference" backend entry
# and the test helpers that hold the SPEC budget
ORACLE_USERS = {"deepforcing_kernels.backends", "deepforcing_kernels.testing"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool):
    """Package-internal modules imported by ``path`` (resolving relative imports)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under top-level try / if blocks still run at import time
        extra = []
        for n in nodes:
            if isinstance(n, (ast.Try, ast.If)):
                extra += [m for m in ast.walk(n) if isinstance(m, (ast.Import, ast.ImportFrom))]
        nodes = nodes + extra
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("deepforcing_kernels")}
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            if not mod.startswith("deepforcing_kernels"):
                continue
            out.add(mod)
            for a in n.names:  # `from . import ops` imports the submodule
                if (PKG.parent / (mod.replace(".", "/") + "/" + a.name + ".py")).exists() or \
                        (PKG.parent / (mod.replace(".", "/") + "/" + a.name)).is_dir():
                    out.add(mod + "." + a.name)
    return out


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def test_no_import_cycle_at_import_time():
    """Module-level imports between package modules form a DAG (a package importing its own submodules, and a
    submodule importing its parent package's already-initialised names, are the usual exceptions: parents are
    not counted as edges from children)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for d in _imports(path, top_level_only=True):
            if d in MODULES and d != name and not name.startswith(d + ".") and d != name.rsplit(".", 1)[0]:
                deps.add(d)
        graph[name] = deps
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_production_module_imports_the_oracle():
    bad = []
    for name, path in MODULES.items():
        if name.startswith("deepforcing_kernels.reference") or name in ORACLE_USERS:
            continue
        if any(d.startswith("deepforcing_kernels.reference") for d in _imports(path, top_level_only=False)):
            bad.append(name)
    assert not bad, f"production modules importing the oracle: {bad}"


def test_extension_reached_only_through_the_backend_layer():
    allowed = {"deepforcing_kernels._ext", "deepforcing_kernels.backends", "deepforcing_kernels.ops",
               "deepforcing_kernels.cpp", "deepforcing_kernels.bench.timing"}
    bad = [n for n, p in MODULES.items() if n not in allowed and
           any(d in ("deepforcing_kernels._ext", "deepforcing_kernels._C") for d in _imports(p, False))]
    assert not bad, f"modules reaching _C from the side: {bad}"


def test_cli_help_imports_no_torch():
    code = ("import sys; from deepforcing_kernels.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'deepforcing --help imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "generate" in r.stdout
