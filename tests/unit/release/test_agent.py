"""The release agent on real git repositories: prepare, accept, reject, rollback, prune, the
lock, and a switch interrupted in the middle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.gitrepo import BUILD, TEST, GitRepo
from vramancer.clock import ManualClock
from vramancer.errors import Conflict, NotFound
from vramancer.release.agent import Refused, ReleaseAgent
from vramancer.release.layout import MARKER, AgentLock, Layout, Releases
from vramancer.release.records import ReleaseState
from vramancer.release.settings import ReleaseSettings


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def agent_for(repo: GitRepo, tmp_path: Path, clock: ManualClock, **over: object) -> ReleaseAgent:
    fields: dict[str, object] = {"build": BUILD, "test": TEST, **over}
    settings = ReleaseSettings(repo=str(repo.path), dir=tmp_path / "deploy", **fields)
    return ReleaseAgent(settings, tmp_path / "data", clock=clock)


def current_version(agent: ReleaseAgent) -> str:
    return (agent.layout.link("current") / "checkout" / "version.txt").read_text().strip()


def test_prepare_accept_reject_and_rollback(repo: GitRepo, tmp_path: Path) -> None:
    clock = ManualClock()
    agent = agent_for(repo, tmp_path, clock)
    first = repo.commit(passing=True, version="v1")

    out = agent.prepare()
    record = out.record
    assert record is not None and record.state is ReleaseState.PASSED
    assert record.commit == first and out.release == record.name
    assert record.name.endswith("-" + first[:7])
    rdir = agent.layout.release_dir(record.name)
    assert (rdir / "checkout" / "built.txt").read_text() == "built\n"
    assert "tests pass" in (rdir / "logs" / "test.log").read_text()
    assert f"building {record.name}" in (rdir / "logs" / "build.log").read_text()
    saved = json.loads((rdir / "result.json").read_text())
    assert saved["build"]["exit_code"] == 0 and saved["test"]["exit_code"] == 0
    assert saved["commit"] == first
    status = agent.status()
    assert status["candidate"] == record.name and status["current"] is None

    agent.act("accept")
    assert current_version(agent) == "v1"
    assert agent.status()["candidate"] is None

    clock.advance(60)
    repo.commit(passing=True, version="v2")
    second = agent.prepare().release
    agent.act("reject")
    assert agent.status()["candidate"] is None
    assert current_version(agent) == "v1"
    assert agent.layout.read(str(second)).state is ReleaseState.REJECTED

    clock.advance(60)
    repo.commit(passing=True, version="v3")
    agent.prepare()
    agent.act("accept")
    assert current_version(agent) == "v3"
    back = agent.act("rollback")
    assert back.release == record.name and current_version(agent) == "v1"
    with pytest.raises(Refused, match="rejected"):
        agent.act("rollback", str(second))


def test_a_failed_test_never_becomes_the_candidate_without_force(
    repo: GitRepo, tmp_path: Path
) -> None:
    clock = ManualClock()
    agent = agent_for(repo, tmp_path, clock)
    repo.commit(passing=True, version="v1")
    agent.prepare()
    agent.act("accept")
    clock.advance(60)
    repo.commit(passing=False, version="v2")

    out = agent.prepare()
    assert out.record is not None and out.record.state is ReleaseState.FAILED
    assert out.record.test.exit_code == 3
    assert out.record.error == "test failed (exit code 3)"
    assert any("not made the candidate" in n for n in out.notes)
    assert agent.status()["candidate"] is None
    assert "a test fails" in agent.logs(out.release, "test")["test"]
    with pytest.raises(Refused, match="no candidate"):
        agent.act("accept")
    with pytest.raises(Refused, match="failed"):
        agent.act("rollback", out.release)
    assert current_version(agent) == "v1"

    clock.advance(60)
    forced = agent.prepare(force=True)
    assert agent.status()["candidate"] == forced.release
    agent.act("accept")
    assert current_version(agent) == "v2"


def test_a_failed_build_stops_before_the_test(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit(passing=True, version="v1")
    agent = agent_for(repo, tmp_path, ManualClock(), build="echo no compiler >&2; exit 7")
    out = agent.prepare()
    assert out.record is not None and out.record.state is ReleaseState.FAILED
    assert out.record.build.exit_code == 7 and out.record.test.exit_code is None
    assert "no compiler" in agent.logs(out.release, "build")["build"]


def test_a_missing_branch_is_a_clear_error(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit(passing=True, version="v1")
    agent = agent_for(repo, tmp_path, ManualClock(), branch="release")
    with pytest.raises(Exception, match="branch 'release' is not in"):
        agent.prepare()
    assert agent.layout.names() == []


def test_prune_keeps_current_and_candidate_and_leaves_foreign_directories(
    repo: GitRepo, tmp_path: Path
) -> None:
    clock = ManualClock()
    agent = agent_for(repo, tmp_path, clock, keep=2)
    repo.commit(passing=True, version="v1")
    oldest = agent.prepare().release
    agent.act("accept")
    foreign = agent.layout.releases / "20200101T000000Z-abcdef0"
    foreign.mkdir()  # a release-looking directory the agent did not make (no marker)
    (foreign / "precious.txt").write_text("keep me")
    names = []
    for i in range(2, 6):
        clock.advance(60)
        repo.commit(passing=True, version=f"v{i}")
        names.append(agent.prepare().release)
    kept = agent.layout.names()
    assert oldest in kept  # current
    assert names[-1] in kept and names[-2] in kept
    assert names[0] not in kept and names[1] not in kept
    assert (foreign / "precious.txt").read_text() == "keep me"
    with pytest.raises(Conflict, match="not a release the agent made"):
        agent.layout.remove(foreign.name)


def test_watch_prepares_only_when_the_branch_moves(repo: GitRepo, tmp_path: Path) -> None:
    clock = ManualClock()
    agent = agent_for(repo, tmp_path, clock)
    head = repo.commit(passing=True, version="v1")
    assert agent.moved() == head
    agent.prepare()
    assert agent.moved() is None
    newer = repo.commit(passing=True, version="v2")
    assert agent.moved() == newer


def test_a_second_agent_waits_then_refuses_naming_the_holder(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit(passing=True, version="v1")
    agent = agent_for(repo, tmp_path, ManualClock(), lock_timeout_s=0.2)
    with AgentLock(agent.layout.lock_path, "prepare"):
        with pytest.raises(Conflict, match=rf"pid {os.getpid()} \(prepare\)"):
            agent.prepare()
        assert agent.status()["busy"]["action"] == "prepare"
    assert agent.status()["busy"] is None

    # a waiting agent goes on once the holder is done
    patient = agent_for(repo, tmp_path, ManualClock(), lock_timeout_s=30)
    lock = AgentLock(agent.layout.lock_path, "accept")
    lock.__enter__()
    timer = threading.Timer(0.3, lock.__exit__, (None, None, None))
    timer.start()
    assert patient.prepare().record is not None
    timer.join()


def test_a_second_agent_process_is_refused(repo: GitRepo, tmp_path: Path) -> None:
    """Two processes: the holder is another program, found through the lock file."""
    repo.commit(passing=True, version="v1")
    agent = agent_for(repo, tmp_path, ManualClock())
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from vramancer.release.layout import AgentLock\n"
        "with AgentLock(Path(sys.argv[1]), 'prepare'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(30)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(agent.layout.lock_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Conflict, match=rf"pid {holder.pid} \(prepare\)"):
            agent.act("accept")
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with pytest.raises(Refused, match="no candidate"):
        agent.act("accept")  # the lock went with its process


def test_a_switch_killed_midway_leaves_current_whole(repo: GitRepo, tmp_path: Path) -> None:
    """The agent dies between making the new link and replacing current with it: current
    still names the old release, whole; the next agent removes the leftover link."""
    clock = ManualClock()
    agent = agent_for(repo, tmp_path, clock)
    repo.commit(passing=True, version="v1")
    agent.prepare()
    agent.act("accept")
    clock.advance(60)
    repo.commit(passing=True, version="v2")
    agent.prepare()
    code = (
        "import os, sys\n"
        "from vramancer.release.agent import ReleaseAgent\n"
        "from vramancer.release.settings import ReleaseSettings\n"
        "real = os.replace\n"
        "def replace(src, dst):  # killed between the two steps of the switch\n"
        "    if os.path.basename(src).startswith('.switch-'):\n"
        "        os._exit(9)\n"
        "    real(src, dst)\n"
        "os.replace = replace\n"
        "s = ReleaseSettings(repo=sys.argv[1], dir=sys.argv[2])\n"
        "ReleaseAgent(s, sys.argv[2]).act('accept')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(repo.path), str(agent.layout.root)], timeout=60
    )
    assert proc.returncode == 9
    leftovers = [p.name for p in agent.layout.root.iterdir() if p.name.startswith(".switch-")]
    assert leftovers, "the killed agent left its temporary link"
    assert current_version(agent) == "v1"
    assert (agent.layout.link("current") / "result.json").exists()

    agent.act("accept")
    assert current_version(agent) == "v2"
    assert not [p for p in agent.layout.root.iterdir() if p.name.startswith(".switch-")]


def test_releases_port_resolves_now(repo: GitRepo, tmp_path: Path) -> None:
    clock = ManualClock()
    agent = agent_for(repo, tmp_path, clock)
    releases = Releases(agent.layout.root)
    with pytest.raises(NotFound, match="no current release"):
        releases.checkout("current")
    repo.commit(passing=True, version="v1")
    first = agent.prepare().release
    agent.act("accept")
    at_start = releases.checkout("current")
    assert at_start == agent.layout.checkout(str(first)).resolve()
    assert releases.checkout(str(first)) == at_start
    with pytest.raises(NotFound):
        releases.checkout("20200101T000000Z-abcdef0")
    assert (agent.layout.release_dir(str(first)) / MARKER).is_file()
    assert isinstance(agent.layout, Layout)


def test_status_shows_a_prepare_in_progress(repo: GitRepo, tmp_path: Path) -> None:
    """While the build runs, status says which release is building and who holds the lock;
    a second agent is refused meanwhile."""
    gate = tmp_path / "go"
    repo.commit(passing=True, version="v1")
    build = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    agent = agent_for(repo, tmp_path, ManualClock(), build=build)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(agent.prepare()))
    worker.start()
    try:
        for _ in range(400):
            status = agent.status()
            if status["releases"] and status["releases"][0]["state"] == "building":
                break
            threading.Event().wait(0.05)
        assert status["releases"][0]["state"] == "building"
        assert status["releases"][0]["pid"] == os.getpid()
        assert status["busy"]["action"] == "prepare"
        with pytest.raises(Conflict, match=r"\(prepare\)"):
            agent.act("accept")
    finally:
        gate.touch()
        worker.join(timeout=60)
    assert agent.status()["releases"][0]["state"] == "passed"
    assert agent.status()["busy"] is None


def test_stopping_the_agent_kills_the_running_step(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit(passing=True, version="v1")
    pidfile = tmp_path / "build.pid"
    agent = agent_for(repo, tmp_path, ManualClock(), build=f"echo $$ > {pidfile}; exec sleep 60")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agent.prepare()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    for _ in range(400):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        threading.Event().wait(0.05)
    build_pid = int(pidfile.read_text())
    agent.stop_event.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert [type(e).__name__ for e in errors] == ["Stopped"]
    with pytest.raises(ProcessLookupError):
        os.kill(build_pid, 0)
    record = agent.status()["releases"][0]
    assert record["state"] == "failed" and "the agent stopped" in record["error"]
    assert agent.status()["candidate"] is None and agent.status()["busy"] is None


def test_status_hides_a_token_in_the_repository_url(tmp_path: Path) -> None:
    from vramancer.release.agent import shown_repo

    url = "https://me:ghp_secret@github.com/me/app.git"
    settings = ReleaseSettings(repo=url, dir=tmp_path / "deploy")
    status = ReleaseAgent(settings, tmp_path).status()
    assert status["repo"] == "https://<redacted>@github.com/me/app.git"
    assert shown_repo("/srv/git/app") == "/srv/git/app"
    assert shown_repo("git@github.com:me/app.git") == "git@github.com:me/app.git"
