"""The folders of src/jsnap are layers, and imports only go down (README, "Design").

Every module is parsed (not imported) and each of its imports of jsnap, wherever it stands
(top level, inside a function, under TYPE_CHECKING), is checked against the layer table:
a module may import its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "jsnap"

# Bottom to top. "base" is the top-level modules (units, errors, the package itself);
# "entry" is `python -m jsnap`, which only calls the CLI.
LAYERS = ("base", "nbd", "stores", "core", "transport", "admin", "cli", "entry")
FOLDERS = {"nbd", "stores", "core", "transport", "admin", "cli"}
ENTRY = {"__main__"}


def layer_of(dotted: str) -> str:
    """The layer of a module (or a name in it) given as `jsnap.a.b...`."""
    parts = dotted.split(".")
    assert parts[0] == "jsnap", dotted
    if len(parts) == 1:
        return "base"
    if parts[1] in FOLDERS:
        return parts[1]
    if parts[1] in ENTRY:
        return "entry"
    return "base"


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    if len(rel.parts) == 1:
        return "entry" if rel.stem in ENTRY else "base"
    return rel.parts[0]


def imported(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, `jsnap...` target) of every jsnap import in the file, in line order; for
    `from P import a, b` each of P.a and P.b (a module or a name: layer_of treats both
    alike)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path, src)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jsnap"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "jsnap":
                continue
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == "jsnap"
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name)
                       and node.func.id in ("__import__", "import_module")))):
            out.append((node.lineno, node.args[0].value))
    return sorted(out)


MODULES = sorted(PKG.rglob("*.py"))


def test_every_folder_is_a_known_layer():
    """A new folder must be placed in LAYERS (and in README's Design) before it is used."""
    folders = {p.relative_to(PKG).parts[0] for p in MODULES if len(p.relative_to(PKG).parts) > 1}
    assert folders == FOLDERS, f"folders not in the layer table: {sorted(folders - FOLDERS)}"


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(SRC)) for p in MODULES])
def test_imports_go_down(path: Path):
    mine = module_layer(path)
    rank = LAYERS.index(mine)
    upward = [f"{path.relative_to(SRC.parent)}:{line}: {mine} imports {target} "
              f"({layer_of(target)})"
              for line, target in imported(path) if LAYERS.index(layer_of(target)) > rank]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_checker_sees_every_form(tmp_path: Path):
    """The forms the check must catch: plain, from-package, aliased, in a function, under
    TYPE_CHECKING, relative, import_module."""
    fake = tmp_path / "jsnap" / "stores" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "import jsnap.core.engine\n"
        "from jsnap import admin\n"
        "from jsnap.cli import commands as c\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from jsnap.transport.server import NbdServer\n"
        "def f():\n    from ..core import plan\n"
        "    import importlib\n    importlib.import_module('jsnap.admin.api')\n"
        "from jsnap.stores.files import OsFile\nfrom jsnap import errors, nbd\n")
    found = [(line, t, layer_of(t)) for line, t in imported(fake, tmp_path)]
    assert found == [
        (1, "jsnap.core.engine", "core"), (2, "jsnap.admin", "admin"),
        (3, "jsnap.cli.commands", "cli"), (6, "jsnap.transport.server.NbdServer", "transport"),
        (8, "jsnap.core.plan", "core"), (10, "jsnap.admin.api", "admin"),
        (11, "jsnap.stores.files.OsFile", "stores"), (12, "jsnap.errors", "base"),
        (12, "jsnap.nbd", "nbd"),
    ]
