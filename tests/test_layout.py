"""The layout STYLE.md promises: the models and the pipeline never import the benchmarks, and
FFCV and Ray are imported only where they live (`qlnas/data/`, `qlnas/search/`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlnas"
OUR_MODULE = re.compile(r"qlnas(\.[A-Za-z_]\w*)+")


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), and our modules it names in a string
    (for importlib)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else ()
            module = ".".join(base + ((node.module,) if node.module else ()))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and OUR_MODULE.fullmatch(node.value):
            names.add(node.value)
    return names


def offenders(folders: list[str], banned: str, exempt: str | None = None) -> list[str]:
    """`file: module` for each import of `banned` (or a sub-module) under the folders."""
    found = []
    for folder in folders:
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            if exempt and path.is_relative_to(PACKAGE / exempt):
                continue
            found += [f"{path.relative_to(PACKAGE.parent)}: {name}" for name in imports(path)
                      if name == banned or name.startswith(banned + ".")]
    return found


def test_the_scan_sees_imports():
    """The guards below would pass vacuously if the scan missed imports."""
    seen = imports(PACKAGE / "data" / "compare.py")
    assert {"ffcv.loader", "ffcv.loader.Loader", "qlnas.data.loaders"} <= seen
    assert "qlnas.bench.loader" in imports(PACKAGE / "bench" / "cli.py")  # an importlib string


@pytest.mark.parametrize("folder", ["models", "data"])
def test_models_and_data_do_not_import_the_benchmarks(folder):
    assert offenders([folder], "qlnas.bench") == []


def test_ffcv_is_imported_only_in_data():
    assert (PACKAGE / "bench" / "loader.py").is_file()
    assert offenders(["."], "ffcv", exempt="data") == []


def test_ray_is_imported_only_in_search():
    assert offenders(["."], "ray", exempt="search") == []


@pytest.mark.parametrize("banned", ["ffcv", "ray"])
def test_scripts_outside_the_package_go_through_it(banned):
    """bench/ and search.py (what `ray submit` runs) reach FFCV and Ray through qlnas."""
    root = PACKAGE.parent
    scripts = sorted((root / "bench").glob("*.py")) + [root / "search.py"]
    assert len(scripts) > 2
    found = [f"{path.relative_to(root)}: {name}" for path in scripts for name in imports(path)
             if name == banned or name.startswith(banned + ".")]
    assert found == []
