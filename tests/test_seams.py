"""Boundaries the code keeps: the server and the CLI use only the engine's interface, and nothing in
the package can unpickle (so nothing unpickles what came over a network)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxserve"
ENGINE_INTERNALS = {"scheduler", "runner", "blocks", "seqs", "grammars"}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def test_server_and_cli_reach_no_engine_internals() -> None:
    files = [*sorted((PACKAGE / "server").glob("*.py")), PACKAGE / "cli.py"]
    reaches = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}"
        for path in files
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_INTERNALS
    ]
    assert not reaches, reaches


def test_nothing_in_the_package_imports_pickle() -> None:
    unpicklers = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "multiprocessing.connection"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names if n in unpicklers or n.split(".")[0] in unpicklers - {"multiprocessing"}]
    assert not found, found
