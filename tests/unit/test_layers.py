"""Blob bytes have one owner: the content layer (``mirror/store``). Outside it, nobody
reaches a blob store or builds a blob's path, so a second storage (object storage) needs
no change in the callers."""

from __future__ import annotations

import ast
from pathlib import Path

import mirror

PACKAGE = Path(mirror.__file__).parent
# What held a blob store before the content layer did.
OWNERS = {"engine", "_engine", "resolver", "self", "walk"}


def _outside_store() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "store" not in p.relative_to(PACKAGE).parts]


def _owner(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")


def _blob_store_uses(tree: ast.AST) -> list[int]:
    """Lines that call into a blob store (``engine.blobs.path``, ``self._blobs.size``...)
    or import one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            store = node.value
            if store.attr in {"blobs", "_blobs"} and _owner(store.value) in OWNERS:
                found.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "mirror.store.blobs":
            found += [node.lineno for alias in node.names if alias.name == "BlobStore"]
    return found


def test_only_the_content_layer_touches_blob_storage() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): lines
        for path in _outside_store()
        if path.name != "engine.py"  # the composition root builds the storage
        if (lines := _blob_store_uses(ast.parse(path.read_text())))
    }
    assert offenders == {}


def test_only_the_send_helper_calls_sendfile() -> None:
    callers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "sendfile"
        if isinstance(node.value, ast.Name) and node.value.id == "os"
    }
    assert callers == {"routes/sending.py"}
