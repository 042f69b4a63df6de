"""``[fastpath]``: the block link between nodes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramancer.units import Size


class FastpathSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: TCP port this node serves its blocks on; None: the fastpath is off (the default).
    port: int | None = Field(default=None, ge=0, le=65535)
    #: Address it listens on. Anything but loopback needs a ``secret``.
    host: str = Field(default="127.0.0.1", max_length=255)
    #: ``host:port`` the other nodes reach this one at, announced in a pool's heartbeats;
    #: default: ``host:port``, or the node's name when ``host`` is every address (``0.0.0.0``).
    advertise: str | None = Field(default=None, max_length=255)
    #: The other nodes' fastpath addresses (``host:port``), asked in the order of the link
    #: table (fastest first) for a block this node does not hold. In a pool, the addresses
    #: the live nodes announce are added.
    peers: list[str] = Field(default_factory=list, max_length=256)
    #: Shared by every node of the pool (``VRM_FASTPATH__SECRET``): a connection proves it with
    #: an HMAC of the server's nonce. Without it, only loopback connections are served.
    secret: str | None = Field(default=None, min_length=32, max_length=4096)
    #: How long a link measurement is trusted before it is measured again.
    probe_ttl_s: float = Field(default=300.0, gt=0)
    #: Bytes moved to measure a link's bandwidth.
    probe_bytes: Size = Field(default=4 * 1024 * 1024, ge=4096, le=1024**3)
    #: A block fetched from a peer is kept in this node's tiers.
    keep_fetched: bool = True
    #: Longest wait for a peer to connect or to send the next bytes.
    timeout_s: float = Field(default=10.0, gt=0, le=3600)
