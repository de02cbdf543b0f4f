"""Blob bytes have one owner: the content layer (``mirror/content``). Outside it, nobody
reaches a blob store or builds a blob's path, so a second storage (object storage) needs
no change in the callers."""

from __future__ import annotations

import ast
from pathlib import Path

import mirror

PACKAGE = Path(mirror.__file__).parent
# What held a blob store before the content layer did.
OWNERS = {"engine", "_engine", "resolver", "self", "walk"}


def _outside_content() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "content" not in p.relative_to(PACKAGE).parts]


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
        if isinstance(node, ast.ImportFrom) and node.module == "mirror.content.blobs":
            found += [node.lineno for alias in node.names if alias.name == "BlobStore"]
    return found


def test_only_the_content_layer_touches_blob_storage() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): lines
        for path in _outside_content()
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
    assert callers == {"web/routes/sending.py"}


# Each layer's folder imports only from the layers below it. Top-level modules (engine,
# config, clock, health, logs, metrics) are the composition root and its plumbing.
BELOW = {
    "domain": {"domain"},
    "content": {"domain", "content"},
    "upstream": {"domain", "upstream"},
    "services": {"domain", "content", "upstream", "services"},
    "web": {"domain", "services", "web"},
}
LAYERS = {"domain", "content", "upstream", "services", "web", "cli"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in BELOW:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mirror."):
                target = _layer(node.module or "")
                if target is not None and target not in BELOW[layer]:
                    wrong.append(f"{path.relative_to(PACKAGE)}: {node.module}")
    assert wrong == []


def test_the_web_layer_reaches_no_storage_through_the_engine_or_the_resolver() -> None:
    """Routes ask services (the resolver, the status service); they never take the store,
    the content layer or the graph off the engine or the resolver themselves."""
    reached = []
    for path in (PACKAGE / "web").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in {"store", "content", "graph", "blobs", "clients"}
                and _owner(node.value) in {"engine", "_engine", "resolver", "_resolver"}
            ):
                reached.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: .{node.attr}")
    assert reached == []
