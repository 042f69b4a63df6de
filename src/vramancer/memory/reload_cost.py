"""What it costs to bring an evicted block back: static by tier latency and size, learned from
measured moves. The eviction index divides a block's coldness by it."""

from __future__ import annotations

from vramancer.errors import InvalidInput

#: Reloading a block costs ``latency × (1 + size / RELOAD_UNIT_BYTES)``: a fixed per-move cost
#: about equal to moving 256 KiB (an NVMe access or a kernel launch plus a copy).
DEFAULT_RELOAD_UNIT_BYTES = 256 * 1024
#: Learned reload cost: EWMA weight of one measured move.
COST_ALPHA = 0.1


class ReloadCostModel:
    """What it costs to bring a block back once evicted, in relative-latency units.

    Static: ``latency × (1 + size / unit_bytes)`` where ``latency`` is the relative latency of the
    tier the block would be reloaded from (1, 1.3, 2.5, 5, 16, 50 for L1..L6). Learned: the store
    may report measured moves with :meth:`observe`; once a tier has measurements, its cost is
    the measured seconds for that size, scaled so that the static and learned figures agree on
    a block of ``unit_bytes`` (the tier's configured latency stays the unit of account).
    """

    def __init__(self, unit_bytes: int = DEFAULT_RELOAD_UNIT_BYTES) -> None:
        if unit_bytes <= 0:
            raise InvalidInput("reload unit must be positive", field="reload_unit_bytes")
        self.unit_bytes = unit_bytes
        #: tier -> (EWMA seconds per move fixed part, EWMA seconds per byte, samples)
        self._learned: dict[str, tuple[float, float, int]] = {}

    def cost(self, size: int, latency: float, tier: str | None = None) -> float:
        """Cost of reloading ``size`` bytes from a tier of relative ``latency``."""
        static = latency * (1.0 + size / self.unit_bytes)
        learned = self._learned.get(tier) if tier is not None else None
        if learned is None or learned[2] < 2:
            return static
        fixed_s, per_byte_s, _ = learned
        reference_s = fixed_s + per_byte_s * self.unit_bytes
        if reference_s <= 0.0:
            return static
        # Scale: a block of unit_bytes costs 2 × latency in both models.
        return 2.0 * latency * (fixed_s + per_byte_s * size) / reference_s

    def observe(self, tier: str, size: int, seconds: float) -> None:
        """Record a measured reload (a move out of ``tier``) of ``size`` bytes taking ``seconds``.

        Splits the time into a fixed part and a per-byte part with the static model's ratio as a
        prior, then smooths both with an EWMA.
        """
        if seconds < 0 or size < 0:
            return
        share_fixed = self.unit_bytes / (self.unit_bytes + size)
        fixed = seconds * share_fixed
        per_byte = (seconds - fixed) / size if size else 0.0
        old = self._learned.get(tier)
        if old is None:
            self._learned[tier] = (fixed, per_byte, 1)
            return
        a = COST_ALPHA
        if per_byte == 0.0:
            per_byte = old[1]
        self._learned[tier] = (
            old[0] + a * (fixed - old[0]),
            old[1] + a * (per_byte - old[1]),
            old[2] + 1,
        )
