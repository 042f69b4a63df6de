"""Device names, one form everywhere: ``gpu:N`` (VRAMancer's GPU index), ``cpu``, and
``NODE/gpu:N`` for a GPU of another node of a pool (a bare ``gpu:N`` means this node).

:class:`DeviceId` is the value every subsystem passes around; :meth:`DeviceId.parse` reads what
a user typed (``cuda:N`` is accepted too, where a torch device is meant, and means ``gpu:N``),
``str()`` is the answer form, and :attr:`DeviceId.torch` is the form torch calls take.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from vramancer.errors import InvalidInput

_LOCAL_RE = re.compile(r"^(?:(cpu)|(?:gpu|cuda):(\d+))$")
#: A node name: what ``node_name`` allows (letters, digits, ``-``, ``_``: node names appear in
#: NATS subjects and KV keys, where ``.`` separates tokens).
NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
_NODE_RE = re.compile(NODE_NAME_PATTERN)
FORMS = "'gpu:N', 'cuda:N', 'cpu' or 'NODE/gpu:N'"


@dataclass(frozen=True, slots=True)
class DeviceId:
    """A GPU (``index``, on ``node`` or this node when None) or the CPU (``index`` None)."""

    index: int | None = None
    node: str | None = None

    def __post_init__(self) -> None:
        if self.index is not None and (isinstance(self.index, bool) or self.index < 0):
            raise ValueError(f"a GPU index must be a non-negative integer, got {self.index!r}")
        if self.node is not None:
            if self.index is None:
                raise ValueError("a node's device must be one of its GPUs ('NODE/gpu:N')")
            if _NODE_RE.match(self.node) is None:
                raise ValueError(f"not a node name: {self.node!r}")

    @classmethod
    def gpu(cls, index: int, node: str | None = None) -> DeviceId:
        """GPU ``index`` (of ``node``, or of this node)."""
        return cls(index, node)

    @classmethod
    def parse(cls, text: str) -> DeviceId:
        """Read ``gpu:N``, ``cuda:N`` (the same GPU), ``cpu`` or ``NODE/gpu:N``.

        Raises ``ValueError`` naming the accepted forms.
        """
        if not isinstance(text, str):
            raise ValueError(f"device must be one of {FORMS}, got {text!r}")
        node, sep, local = text.strip().rpartition("/")
        match = _LOCAL_RE.match(local.strip().lower())
        if match is None or (sep and (match.group(1) or _NODE_RE.match(node) is None)):
            raise ValueError(f"device must be one of {FORMS}, got {text!r}")
        if match.group(1):
            return CPU
        return cls(int(match.group(2)), node if sep else None)

    @classmethod
    def parse_input(cls, text: str, field: str = "device") -> DeviceId:
        """:meth:`parse` for a user's input: ``InvalidInput`` (422) naming ``field``."""
        try:
            return cls.parse(text)
        except ValueError as exc:
            raise InvalidInput(str(exc), field=field) from None

    @property
    def is_cpu(self) -> bool:
        return self.index is None

    @property
    def is_gpu(self) -> bool:
        return self.index is not None

    @property
    def is_local(self) -> bool:
        """A device of this node (no ``NODE/`` prefix)."""
        return self.node is None

    def local(self) -> DeviceId:
        """The same device without its node (``NODE/gpu:1`` -> ``gpu:1``)."""
        return DeviceId(self.index) if self.node is not None else self

    @property
    def torch(self) -> str:
        """The torch device string: ``cuda:N`` or ``cpu``. A GPU of another node has none."""
        if self.node is not None:
            raise ValueError(f"{self} is a GPU of another node; torch cannot address it")
        return "cpu" if self.index is None else f"cuda:{self.index}"

    def __str__(self) -> str:
        if self.index is None:
            return "cpu"
        name = f"gpu:{self.index}"
        return f"{self.node}/{name}" if self.node is not None else name


#: The CPU.
CPU = DeviceId()


def node_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a node of a pool, or None."""
    if _NODE_RE.match(name):
        return None
    return (
        f"{name!r} cannot name a node: 1 to 63 letters, digits, '-' or '_', starting with a "
        "letter or digit (node names appear in NATS subjects)"
    )


@functools.lru_cache(maxsize=1024)
def gpu_name(index: int, node: str | None = None) -> str:
    """``str(DeviceId.gpu(index, node))``, remembered: the name hot paths (the task picker's
    views, every dispatch round) key their tables by."""
    return str(DeviceId.gpu(index, node))
