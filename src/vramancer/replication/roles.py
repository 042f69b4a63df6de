"""Roles and epochs, the pure part: which role a node starts in, who the primary is.

The epoch starts at 1 and only a promotion raises it (by one). A node configured as primary
starts as standby when a peer answers with a higher epoch (it was replaced while it was away),
or with the same epoch as a primary (never two primaries of one epoch). Promotion is manual:
two nodes cannot tell a dead peer from a cut link, so a node never promotes itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramancer.replication.settings import HaRole


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What a peer answered about itself."""

    address: str
    epoch: int
    role: HaRole
    acked_seq: int


@dataclass(frozen=True, slots=True)
class StartRole:
    role: HaRole
    #: The primary's address when known (a standby's writes are refused naming it).
    primary: str | None
    #: Why, in a sentence (logged).
    reason: str


def start_role(configured: HaRole, epoch: int, peers: list[PeerStatus]) -> StartRole:
    """The role to start in (see the module docstring)."""
    newer = [p for p in peers if p.epoch > epoch]
    rival = [p for p in peers if p.epoch == epoch and p.role is HaRole.PRIMARY]
    primaries = sorted(
        (p for p in peers if p.role is HaRole.PRIMARY), key=lambda p: p.epoch, reverse=True
    )
    known = primaries[0].address if primaries else None
    if configured is HaRole.STANDBY:
        return StartRole(HaRole.STANDBY, known, "configured as standby")
    if newer:
        best = max(newer, key=lambda p: p.epoch)
        return StartRole(
            HaRole.STANDBY,
            known or best.address,
            f"peer {best.address} is at epoch {best.epoch}, newer than this node's {epoch}",
        )
    if rival:
        return StartRole(
            HaRole.STANDBY,
            rival[0].address,
            f"peer {rival[0].address} is already primary at epoch {epoch}",
        )
    return StartRole(HaRole.PRIMARY, None, "configured as primary")


def primary_address(advertised: str, peers: list[str]) -> str:
    """The primary's address as this node knows it: the peer entry that is the advertised
    address, else the only peer entry on the same port, else the advertised address."""
    if advertised in peers:
        return advertised
    port = advertised.rpartition(":")[2]
    same_port = [p for p in peers if p.rpartition(":")[2] == port]
    return same_port[0] if len(same_port) == 1 else advertised
