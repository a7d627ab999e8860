"""The import rule of the layout (README, docs/design.md): each top-level package is one concern and
imports run one way. Every import statement counts, including those inside functions."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "cli": {"localservices", "pipelines", "documents", "serving", "compression", "monitoring", "training",
            "synthetic", "model", "runtime"},
    "localservices": {"runtime"},
    "dags": {"pipelines"},
    "pipelines": {"serving", "monitoring", "documents", "runtime"},
    "serving": {"compression", "monitoring", "model", "documents", "runtime"},
    "training": {"model", "synthetic", "documents", "runtime"},
    "synthetic": {"documents"},
    "compression": {"model", "runtime"},
    "monitoring": {"model", "runtime"},
    "documents": set(),
    "model": {"runtime"},
    "runtime": set(),
}


def project_imports(path: Path) -> set[str]:
    """The top-level project packages a file imports."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported & set(ALLOWED)


def test_every_top_level_package_has_a_rule():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} | {"dags"}
    assert packages == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_run_one_way(package):
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sorted((REPO / package).rglob("*.py"))
        for name in project_imports(path) - ALLOWED[package] - {package}
    }
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}: " + "; ".join(sorted(wrong))


def test_nothing_imports_the_command_line_or_the_dags():
    assert not any({"cli", "dags"} & allowed for allowed in ALLOWED.values())


def test_the_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cli.main import main\n    import serving.app\n")
    assert project_imports(module) == {"cli", "serving"}
