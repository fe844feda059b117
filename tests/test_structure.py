"""The package's structure holds: no import cycle and no upward import (reading every import in a file, function level
too), the oracle stays an oracle, no production file is a god file, the CLI's help needs no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "deepforcing_kernels"
# modules allowed to import the oracle (deepforcing_kernels/reference/): the registry's "reference" backend entry
# and the test helpers that hold the docs/spec.md section 7 budget
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

# The layers of the package, lowest first. A module may import its own layer (without a cycle) and the ones below,
# never one above: the kernels know nothing of the cache, the cache nothing of models, the driver nothing of the
# front end, and nothing below the command line imports it. Each module belongs to the layer of its longest
# listed prefix; a module no prefix names fails the test (a new module takes a place here).
LAYERS = (
    ("core", ("presets", "formats", "plotting", "_scalars", "_checks", "_ext", "rope", "rotation", "reference",
              "commit_option",
              "triton", "ops", "cpp", "backends", "attention", "testing", "policy", "policy_checks", "blockrel",
              "schedule")),
    ("cache", ("cache",)),
    ("model", ("models", "checkpoints", "sampler")),
    ("rollout", ("runio", "driver")),
    ("front end", ("video", "pipeline", "steering")),
    ("distributed", ("distributed",)),
    ("bench", ("bench",)),
    ("serve", ("serve",)),
    ("command line", ("commands", "cli", "__main__")),
)


def _layer(module: str):
    rel = module[len("deepforcing_kernels."):] if module != "deepforcing_kernels" else ""
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if rel == pre or rel.startswith(pre + "."):
                if best is None or len(pre) > best[1]:
                    best = (rank, len(pre))
    return None if best is None else best[0]


def import_graph(modules=None):
    """``{module: {imported package modules}}`` over every import statement of each file (function-level imports
    too: a cycle through a function-level import is still a cycle, only deferred). A module importing one of its
    ancestor packages is not an edge: the ancestor is already initialised by the time the child runs."""
    modules = MODULES if modules is None else modules
    graph = {}
    for name, path in modules.items():
        graph[name] = {d for d in _imports(path, top_level_only=False)
                       if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def find_cycle(graph):
    """One import cycle of ``graph`` as a list ``[a, b, ..., a]``, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def upward_imports(graph):
    """``[(importer, imported)]`` where a module imports a module of a higher layer."""
    return sorted((a, b) for a, ds in graph.items() for b in ds
                  if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a))


def test_no_import_cycle_through_any_import():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (function-level imports count): " + " -> ".join(cycle)


def test_no_upward_import():
    unplaced = sorted(n for n in MODULES if n != "deepforcing_kernels" and _layer(n) is None)
    assert not unplaced, f"modules in no layer of LAYERS (give each a place): {unplaced}"
    bad = upward_imports(import_graph())
    assert not bad, "imports from a higher layer: " + "; ".join(
        f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]})" for a, b in bad)


def test_the_checks_catch_a_planted_cycle_and_an_upward_import(tmp_path):
    """The detectors above are not vacuous: a scratch package with a function-level cycle and an upward import
    (written as the package's own files would be) is caught."""
    pkg = tmp_path / "deepforcing_kernels"
    (pkg / "cache").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rope.py").write_text("def f():\n    from .cache import g\n    return g\n")        # core -> cache
    (pkg / "cache" / "__init__.py").write_text("from ..rope import f\n\ndef g():\n    return f\n")
    mods = {"deepforcing_kernels.rope": pkg / "rope.py", "deepforcing_kernels.cache": pkg / "cache" / "__init__.py"}
    global PKG
    saved, PKG = PKG, pkg
    try:
        graph = import_graph(mods)
    finally:
        PKG = saved
    assert find_cycle(graph) == ["deepforcing_kernels.cache", "deepforcing_kernels.rope", "deepforcing_kernels.cache"]
    assert upward_imports(graph) == [("deepforcing_kernels.rope", "deepforcing_kernels.cache")]


#: no production file longer than this: a file past it mixes concerns that want their own modules
MAX_LINES = 500


def test_no_production_file_over_the_line_limit():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them along their seams): {long}"


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


def test_every_spec_citation_resolves():
    """The code cites its semantics as "docs/spec.md section N": the file is in the tree and has each section."""
    import re

    spec = PKG.parent / "docs" / "spec.md"
    assert spec.is_file(), "docs/spec.md (the semantics the code cites) is missing"
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", spec.read_text(), flags=re.M)}
    cited = []
    for p in list(PKG.rglob("*.py")) + [PKG.parent / "README.md"]:
        for a, b in re.findall(r"docs/spec\.md sections? (\d+)(?:-(\d+))?", p.read_text()):
            cited += [(p.name, int(n)) for n in range(int(a), int(b or a) + 1)]
    assert cited, "no citation found: the pattern is stale"
    missing = sorted({c for c in cited if c[1] not in sections})
    assert not missing, f"citations of sections docs/spec.md does not have: {missing}"
    stale = [p.name for p in PKG.rglob("*.py") if re.search(r"\bSPEC(\.md)? section", p.read_text())]
    assert not stale, f"citations of a SPEC.md that is not in the tree: {stale}"


def test_ruff_clean():
    """The lint rules pinned in pyproject.toml (E, F, W, I) hold over the package, the tests and the benchmarks."""
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail("ruff is missing from the environment: `make setup` installs requirements.txt, which lists it")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([str(ruff), "check", "--output-format", "concise", "deepforcing_kernels", "tests", "benchmarks"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
