"""The dependency rules of the tree: `pallas_kernels` <- `mesh` <- `recsys`, and no module
uses another's private names. Read from the source, so a violation fails here before it
turns into an import cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pallas_kernels", "mesh", "recsys", "benchmarks", "examples", "tests")
# What each package may import from the project, beside itself.
ALLOWED = {
    "pallas_kernels": set(),
    "mesh": {"pallas_kernels"},
    "recsys": {"pallas_kernels", "mesh"},
}


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path, ast.parse(path.read_text(), str(path))


def _imports(tree):
    """(module, names) of every import, relative imports resolved to nothing."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, tuple(alias.name for alias in node.names)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package):
    wrong = []
    for owner, path, tree in _modules():
        if owner != package:
            continue
        for module, _ in _imports(tree):
            top = module.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_private_names():
    wrong = []
    for _, path, tree in _modules():
        for module, names in _imports(tree):
            if module.split(".")[0] not in PACKAGES:
                continue
            private = [n for n in names if n.startswith("_")] + [
                p for p in module.split(".") if p.startswith("_")
            ]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(private)}")
        for node in ast.walk(tree):  # module.attribute access of a project module's private name
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                if isinstance(node.value, ast.Name) and node.value.id in _project_module_names(tree):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def _project_module_names(tree) -> set[str]:
    """Names bound to project modules by `import x.y as z` / `from x import module`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for alias in node.names:
                if (ROOT / node.module.replace(".", "/") / alias.name).with_suffix(".py").exists() or (
                    ROOT / node.module.replace(".", "/") / alias.name
                ).is_dir():
                    names.add(alias.asname or alias.name)
    return names
