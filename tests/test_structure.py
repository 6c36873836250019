"""The package's shape: no private name used across modules, no module over the length limit.

The layers themselves (who may import whom, no cycles, where backend frameworks are imported) are import-linter
contracts in pyproject.toml, checked by `lint-imports` in .ci/run; docs/architecture.md draws them.
"""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.once

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "keras_dinov2"
MAX_MODULE_LINES = 450


def _python_files():
    for folder in ("keras_dinov2", "tests", "tools", "examples"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _module_name(path):
    """Dotted name of a file under keras_dinov2/, or None for tests, tools and examples."""
    if not path.is_relative_to(PACKAGE):
        return None
    relative = path.relative_to(ROOT)
    if relative.parts[0] != "keras_dinov2":
        return None
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_private_module(importer, module, name):
    """A package importing its own private submodule (a package `__init__` importing its own `_module`)."""
    folder = PACKAGE.parent / module.replace(".", "/")
    return importer is not None and module == importer and (folder / f"{name}.py").exists()


def private_uses(path):
    """(line, text) of each private name of a keras_dinov2 module used in `path` from outside that module."""
    importer = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("keras_dinov2"):
            for alias in node.names:
                if _is_private(alias.name) and not _own_private_module(importer, node.module, alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                submodule = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / submodule.replace(".", "/")).exists() or (
                    PACKAGE.parent / (submodule.replace(".", "/") + ".py")
                ).exists():
                    aliases[alias.asname or alias.name] = submodule
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_dinov2"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or "keras_dinov2"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _is_private(node.attr)
            and aliases[node.value.id] != importer
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_no_private_name_is_used_outside_its_module():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {text}" for path in _python_files() for line, text in private_uses(path)
    ]
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


def test_the_private_name_check_sees_both_forms(tmp_path):
    # The check itself: an import of a private name and an attribute access through a module alias.
    sample = tmp_path / "sample.py"
    sample.write_text("from keras_dinov2.data import _hidden\nfrom keras_dinov2 import ops\nops._cpu_function\n")
    uses = [text for _, text in private_uses(sample)]
    assert uses == ["from keras_dinov2.data import _hidden", "ops._cpu_function"]


def test_no_module_is_over_the_length_limit():
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
