"""The import rules of docs/architecture.md, checked on the source (ruff's TID251 only knows
"library never imports api/cli, only nvidia.py imports pynvml"; this checks every layer).

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import vramancer

SRC = Path(vramancer.__file__).parent
KERNEL = frozenset(
    {
        "events",
        "event_types",
        "units",
        "blockids",
        "clock",
        "errors",
        "files",
        "plugins",
        "observability",
        "_version",
        "config_hints",
    }
)
#: What each part of the package may import from the others (docs/architecture.md, "Layers").
ALLOWED: dict[str, frozenset[str]] = {
    **{name: KERNEL for name in KERNEL},
    "devices": KERNEL,
    "resources": KERNEL | {"devices"},
    "memory": KERNEL | {"devices"},
    "arbiter": KERNEL | {"devices"},
    "models": KERNEL | {"devices", "arbiter", "resources"},
    # tasks reaches the memory store and the models through its ports (tasks/ports.py) only.
    "tasks": KERNEL | {"devices", "arbiter"},
    # The pool (NATS JetStream) drives the task service's queue, picker and workers.
    "pool": KERNEL | {"devices", "arbiter", "tasks"},
    # Replication journals and applies the state of the services below it.
    "replication": KERNEL | {"devices", "memory", "arbiter", "models", "tasks"},
    # The fastpath: block bytes between nodes, served from and stored into the memory store.
    "fastpath": KERNEL | {"memory"},
    # The release agent: git -> candidate -> tests (as a task) -> atomic switch.
    "release": KERNEL | {"devices", "arbiter", "tasks", "client"},
    # The model gateway: request queues per model, made resident through the model manager.
    "gateway": KERNEL | {"devices", "arbiter", "models"},
    # config imports each section's settings module (checked below), nothing else.
    "config": KERNEL
    | {"devices", "resources", "memory", "arbiter", "models", "tasks", "pool", "replication"}
    | {"fastpath", "release", "gateway"},
    "runtime": KERNEL
    | {"config", "devices", "resources", "memory", "arbiter", "models", "tasks", "replication"}
    | {"pool", "fastpath", "release"},
    "api": KERNEL
    | {"config", "runtime", "devices", "resources", "memory", "arbiter", "models", "tasks"}
    | {"replication", "pool", "web", "release", "gateway"},
    "cli": KERNEL
    | {"config", "runtime", "devices", "resources", "memory", "arbiter", "models", "tasks"}
    | {"replication", "pool", "api", "client", "release"},
    # The daemon's HTTP client: plain HTTP, the kernel only (cheap to import).
    "client": KERNEL,
    "web": frozenset(),
    "main": frozenset({"cli"}),
    "__init__": frozenset({"_version", "config", "runtime", "client"}),
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _runtime_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, module) of every import not guarded by ``if TYPE_CHECKING:``."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vramancer":  # from vramancer import api
                yield from ((node.lineno, f"vramancer.{a.name}") for a in node.names)
            else:
                yield node.lineno, node.module


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in _sources():
        part = _part(path)
        assert part in ALLOWED, (
            f"{part}: a new part of the package; give it a layer in docs/architecture.md "
            "and in ALLOWED here"
        )
        for line, module in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if not module.startswith("vramancer."):
                continue
            target = module.split(".")[1]
            if target != part and target not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_config_imports_only_settings_modules_of_the_subsystems() -> None:
    tree = ast.parse((SRC / "config.py").read_text())
    for _, module in _runtime_imports(tree):
        parts = module.split(".")
        if parts[0] == "vramancer" and parts[1] not in KERNEL:
            assert parts[2:] == ["settings"], module


def test_only_the_nvidia_module_imports_pynvml() -> None:
    users = {
        str(path.relative_to(SRC))
        for path in _sources()
        for _, module in _runtime_imports(ast.parse(path.read_text()))
        if module.split(".")[0] == "pynvml"
    }
    assert users == {"devices/nvidia.py"}


def test_only_the_blosc2_codec_module_imports_blosc2() -> None:
    users = {
        str(path.relative_to(SRC))
        for path in _sources()
        for _, module in _runtime_imports(ast.parse(path.read_text()))
        if module.split(".")[0] == "blosc2"
    }
    assert users == {"memory/blosc2_codec.py"}


def test_the_checker_sees_a_forbidden_import() -> None:
    """The walker itself: a guarded import is skipped, a real one is found."""
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from vramancer.api import app\n"
        "from vramancer import cli\n"
        "def f():\n    import vramancer.api.deps\n"
    )
    assert [m for _, m in _runtime_imports(tree) if m.startswith("vramancer")] == [
        "vramancer.cli",
        "vramancer.api.deps",
    ]
