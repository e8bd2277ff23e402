"""The package's import structure (issue 22, docs/ARCHITECTURE.md "Layers"): the import-linter
contracts hold and catch an upward import, there is no import circle, own modules are imported at
the top of modules, and the command line starts without torch or transformers."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "himap_trt"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: The deliberate function-level imports of the package's own modules: (module, imported module).
#: Each carries a comment at its line saying why; anything else belongs at the top of the module.
ALLOWED_FUNCTION_LEVEL: set[tuple[str, str]] = set()


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's pyproject.toml contracts, on the package under ``root``."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": str(LINT_IMPORTS.parent)}, timeout=120)


def test_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, planted", [
    ("graphs/spec.py", "import himap_trt.arch\n"),              # graphs reaching up into the families
    ("errors.py", "from himap_trt.plan import PruningPlan\n"),   # a foundation importing a sibling above it
    ("triton/protocol.py", "import himap_trt.serve.app\n"),     # two independent services
])
def test_planted_import_breaks_the_contracts(tmp_path, module, planted):
    copy = tmp_path / "himap_trt"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "weights", "*.json"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0                      # the copy itself is clean
    target = copy / module
    target.write_text(target.read_text() + "\n" + planted)
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 broken" not in result.stdout
    name = "himap_trt." + module.removesuffix(".py").replace("/", ".")
    assert f"{name} is not allowed to import" in result.stdout or f"{name} ->" in result.stdout


def _import_graph() -> grimp.ImportGraph:
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph("himap_trt", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import statement."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_circles():
    assert _cycles(_import_graph()) == []


def test_cycle_finder_finds_a_circle():
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.x")
    graph.add_import(importer="a.y", imported="a.z")
    assert _cycles(graph) == [["a.x", "a.y"]]


def _function_level_imports() -> set[tuple[str, str]]:
    """(module, imported own module) for every import of a ``himap_trt`` module inside a function."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("himap_trt"):
                    found.add((module, node.module))
                elif isinstance(node, ast.Import):
                    found.update((module, a.name) for a in node.names if a.name.startswith("himap_trt"))
    return found


def test_own_modules_are_imported_at_the_top():
    assert _function_level_imports() == ALLOWED_FUNCTION_LEVEL


def test_lazy_imports_only_in_the_command_line():
    """lazy_import hides a dependency from import-linter, so only the top layer may use it."""
    users = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "lazy_import(" in p.read_text()}
    assert users and all(user.startswith("cli/") for user in users), users


def test_cli_starts_without_torch_or_transformers():
    heavy = ("torch", "transformers", "onnxruntime", "onnx", "tensorrt", "numpy", "fastapi", "matplotlib")
    code = ("import sys\nfrom typer.testing import CliRunner\nimport himap_trt.cli as cli\n"
            "runner = CliRunner()\n"
            "for args in ([\"--help\"], [\"--version\"], *([c, \"--help\"] for c in (\"flops\", \"export\", \"run\", "
            "\"build\", \"check\", \"bench\", \"analyze\", \"serve\", \"bench-serve\", \"eval\")), "
            "[\"triton\", \"repo\", \"--help\"], [\"triton\", \"serve\", \"--help\"]):\n"
            "    result = runner.invoke(cli.app, args)\n"
            "    assert result.exit_code == 0, (args, result.output)\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
