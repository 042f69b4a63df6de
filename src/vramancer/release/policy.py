"""What each release action would do, as a plan; pure (no I/O). ``agent.py`` applies plans.

A plan is the link switches and removals to make, in order, or the reason it is refused.
Rules: a failed (or unfinished) release never becomes the candidate or current without
``force``; ``prune`` keeps the newest ``keep`` releases and never removes ``current`` or
``candidate``; ``rollback`` without a name goes back to the release that was current before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from vramancer.release.records import DeployView, ReleaseInfo, ReleaseState


class StepKind(StrEnum):
    #: Point a link (``current``/``candidate``) at a release (atomically).
    LINK = "link"
    #: Remove a link.
    UNLINK = "unlink"
    #: Record a release's new state in its ``result.json``.
    MARK = "mark"
    #: Remove a release's directory.
    REMOVE = "remove"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    #: The link (``current``, ``candidate``) or the release.
    target: str
    #: The release a link points at; the state a ``mark`` records.
    value: str | None = None

    def describe(self) -> str:
        if self.kind is StepKind.LINK:
            return f"point {self.target} at {self.value}"
        if self.kind is StepKind.UNLINK:
            return f"remove the {self.target} link"
        if self.kind is StepKind.MARK:
            return f"mark {self.target} {self.value}"
        return f"remove release {self.target}"


@dataclass(frozen=True)
class Plan:
    action: str
    steps: tuple[Step, ...] = ()
    #: Why nothing is done (None: the plan may be applied).
    refused: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.refused is None

    def describe(self) -> list[str]:
        return [s.describe() for s in self.steps]


def _usable(release: ReleaseInfo, force: bool) -> str | None:
    """Why ``release`` may not go live (None: it may)."""
    if release.state is ReleaseState.PASSED or release.forced:
        return None
    if release.state.in_progress and not release.stale:
        return f"release {release.name} is still {release.state.value}"
    if force:
        return None
    return (
        f"release {release.name} is {release.state.value}"
        f"{' (its agent stopped)' if release.stale else ''}; --force takes it anyway"
    )


def plan_prepare(view: DeployView, head: str) -> Plan:
    """Whether the branch's head ``head`` needs a new release (what ``watch`` asks): refused
    when a release of that commit exists already (whatever its state: a failed one is not
    tried again until the branch moves or a person runs ``prepare``)."""
    made = next((r for r in reversed(view.releases) if r.commit == head), None)
    if made is not None:
        return Plan("prepare", refused=f"{head[:12]} is release {made.name} already")
    return Plan("prepare", notes=(f"the branch moved to {head[:12]}",))


def plan_candidate(view: DeployView, name: str, *, force: bool = False) -> Plan:
    """After prepare: a passed release becomes the candidate (a failed one only with force)."""
    release = view.get(name)
    if release is None:
        return Plan("candidate", refused=f"no release {name}")
    why = _usable(release, force)
    if why is not None:
        return Plan("candidate", refused=why)
    return Plan("candidate", (Step(StepKind.LINK, "candidate", name),))


def plan_accept(view: DeployView, *, force: bool = False) -> Plan:
    """The candidate becomes current; the candidate link goes."""
    if view.candidate is None:
        return Plan("accept", refused="there is no candidate (vramancer release prepare)")
    release = view.get(view.candidate)
    if release is None:
        return Plan(
            "accept", refused=f"the candidate link names a missing release {view.candidate}"
        )
    why = _usable(release, force)
    if why is not None:
        return Plan("accept", refused=why)
    return Plan(
        "accept",
        (Step(StepKind.LINK, "current", release.name), Step(StepKind.UNLINK, "candidate")),
    )


def plan_reject(view: DeployView) -> Plan:
    """The candidate is marked rejected and its link goes; current stays."""
    if view.candidate is None:
        return Plan("reject", refused="there is no candidate to reject")
    return Plan(
        "reject",
        (
            Step(StepKind.UNLINK, "candidate"),
            Step(StepKind.MARK, view.candidate, ReleaseState.REJECTED.value),
        ),
    )


def previous_release(view: DeployView) -> ReleaseInfo | None:
    """The release that was current before the current one (latest ``accepted_at``)."""
    accepted = [r for r in view.releases if r.accepted_at is not None and r.name != view.current]
    return max(accepted, key=lambda r: r.accepted_at or 0.0, default=None)


def plan_rollback(view: DeployView, name: str | None = None, *, force: bool = False) -> Plan:
    """``current`` goes back to ``name``, or to the release that was current before."""
    if name is None:
        release = previous_release(view)
        if release is None:
            return Plan("rollback", refused="no release was current before this one")
    else:
        release = view.get(name)
        if release is None:
            return Plan("rollback", refused=f"no release {name}")
    if release.name == view.current:
        return Plan("rollback", refused=f"{release.name} is already current")
    why = _usable(release, force)
    if why is not None:
        return Plan("rollback", refused=why)
    return Plan("rollback", (Step(StepKind.LINK, "current", release.name),))


def plan_prune(view: DeployView, keep: int) -> Plan:
    """Remove releases past the newest ``keep``, never ``current`` nor ``candidate`` nor one
    still being prepared."""
    protected = {view.current, view.candidate}
    newest = {r.name for r in view.releases[-keep:]} if keep > 0 else set()
    steps = tuple(
        Step(StepKind.REMOVE, r.name)
        for r in view.releases
        if r.name not in protected
        and r.name not in newest
        and not (r.state.in_progress and not r.stale)
    )
    return Plan("prune", steps)
