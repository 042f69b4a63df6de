"""Settings: defaults < TOML file < VRM_* environment; bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramancer.config import DEFAULT_PORT, Role, Settings
from vramancer.errors import ConfigError

GIB = 1024**3


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without VRM_* variables from the outer environment."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("VRM_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vramancer.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = Settings.load()
    assert (s.server.host, s.server.port) == ("127.0.0.1", DEFAULT_PORT)
    assert s.auth.tokens == {}
    assert s.devices.poll_interval_s == 1.0 and s.devices.simulated == []
    assert s.devices.vram_change_threshold == 100 * 1024**2
    assert (s.resources.memory_threshold, s.resources.gpu_memory_threshold) == (0.8, 0.85)
    assert s.metrics_port is None and s.tracing is False and s.disable_rate_limit is False
    assert s.data_dir.name == "vramancer"


def test_toml_overrides_defaults_and_env_overrides_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        """
        [server]
        port = 9000
        rate_limit_burst = 5
        [auth]
        tokens = { "s3cret" = "operator" }
        [devices]
        poll_interval_s = 2.5
        [[devices.simulated]]
        name = "sim0"
        memory = "24GiB"
        [resources]
        memory_threshold = 0.7
        """,
    )
    from_file = Settings.load(path)
    assert from_file.server.port == 9000 and from_file.server.rate_limit_burst == 5
    assert from_file.server.host == "127.0.0.1"  # untouched keys keep their default
    assert from_file.auth.tokens == {"s3cret": Role.OPERATOR}
    assert from_file.devices.poll_interval_s == 2.5
    assert from_file.devices.simulated[0].memory == 24 * GIB
    assert from_file.resources.memory_threshold == 0.7
    monkeypatch.setenv("VRM_SERVER__PORT", "9100")
    monkeypatch.setenv("VRM_DEVICES__POLL_INTERVAL_S", "0.5")
    monkeypatch.setenv("VRM_RESOURCES__GPU_MEMORY_THRESHOLD", "0.9")
    monkeypatch.setenv("VRM_METRICS_PORT", "9464")
    monkeypatch.setenv("VRM_DISABLE_RATE_LIMIT", "1")
    both = Settings.load(path)
    assert both.server.port == 9100  # env beats TOML
    assert both.server.rate_limit_burst == 5  # TOML kept where env is silent
    assert both.devices.poll_interval_s == 0.5
    assert both.resources.gpu_memory_threshold == 0.9
    assert both.resources.memory_threshold == 0.7
    assert both.metrics_port == 9464 and both.disable_rate_limit is True


def test_vrm_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 9200\n")
    monkeypatch.setenv("VRM_CONFIG", str(path))
    assert Settings.load().server.port == 9200


def test_data_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_DATA_DIR", str(tmp_path / "d"))
    assert Settings.load().data_dir == tmp_path / "d"


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[devices]\npoll_intervall_s = 2\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert "devices.poll_intervall_s: unknown key" in info.value.message


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"devicez: unknown key"):
        Settings.load(write(tmp_path, "[devicez]\nx = 1\n"))


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ("[server]\nport = 99999\n", "server.port", "less than or equal to 65535"),
        ("[devices]\npoll_interval_s = 0\n", "devices.poll_interval_s", "greater than 0"),
        ('[devices]\nvram_change_threshold = "lots"\n', "devices.vram_change_threshold",
         "expected an integer number of bytes or a string such as '512MiB'"),
        ("[resources]\nmemory_threshold = 1.5\n", "resources.memory_threshold",
         "less than or equal to 1"),
        ('[auth]\ntokens = { "t" = "root" }\n', "auth.tokens.t", "'viewer', 'operator' or 'admin'"),
    ],
)  # fmt: skip
def test_a_bad_value_names_the_key_and_the_expected_form(
    tmp_path: Path, toml: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(write(tmp_path, toml))
    assert f"{key}:" in info.value.message
    assert expected in info.value.message


def test_a_bad_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_SERVER__PORT", "eighty")
    with pytest.raises(ConfigError, match=r"VRM_SERVER__PORT: .*integer"):
        Settings.load()


def test_missing_or_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        Settings.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        Settings.load(write(tmp_path, "[server\nport = 1\n"))


def test_an_unknown_vrm_variable_is_named_with_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VRM_METRICS_PROT", "9464")
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert "VRM_METRICS_PROT: unknown setting" in info.value.message
    assert "did you mean VRM_METRICS_PORT?" in info.value.message
    monkeypatch.delenv("VRM_METRICS_PROT")
    monkeypatch.setenv("VRM_DEVICE__POLL_INTERVAL_S", "2")  # section misspelt
    with pytest.raises(
        ConfigError,
        match=r"VRM_DEVICE__POLL_INTERVAL_S: .*did you mean VRM_DEVICES__POLL_INTERVAL_S\?",
    ):
        Settings.load()


def test_a_misspelt_nested_vrm_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_SERVER__HOTS", "0.0.0.0")
    monkeypatch.setenv("VRM_MEMORY__TIERS__l4__CAPCITY", "1GiB")  # a free table's key passes
    monkeypatch.setenv("VRM_MEMORY__REGULATOR__ENABLD", "1")
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert info.value.message.splitlines()[1:] == [
        "  VRM_MEMORY__REGULATOR__ENABLD: unknown setting (ENABLD is not a key of "
        "VRM_MEMORY__REGULATOR); did you mean VRM_MEMORY__REGULATOR__ENABLED?",
        "  VRM_MEMORY__TIERS__l4__CAPCITY: unknown setting (CAPCITY is not a key of "
        "VRM_MEMORY__TIERS__L4); did you mean VRM_MEMORY__TIERS__L4__CAPACITY?",
        "  VRM_SERVER__HOTS: unknown setting (HOTS is not a key of VRM_SERVER); "
        "did you mean VRM_SERVER__HOST?",
    ]


def test_a_misspelt_key_in_the_file_is_named_as_written_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nprot = 1\n[memory.tiers.l4]\ncapcity = "1GiB"\n')
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert info.value.message.splitlines()[1:] == [
        f"  server.prot: unknown key; did you mean server.port? (in {path})",
        f"  memory.tiers.l4.capcity: unknown key; did you mean memory.tiers.l4.capacity? "
        f"(in {path})",
    ]


def test_the_cli_and_task_variables_are_not_settings_and_not_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A task started by VRAMancer (VRM_TASK_ID ... set) may itself run ``vramancer status``."""
    for name in ("VRM_URL", "VRM_API_TOKEN", "VRM_TASK_ID", "VRM_TASK_ATTEMPT", "VRM_DEVICE",
                 "VRM_SCRATCH_DIR"):  # fmt: skip
        monkeypatch.setenv(name, "x")
    assert Settings.load().server.port == DEFAULT_PORT


def test_ha_needs_a_long_secret_and_well_formed_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_HA_REPLICATION", "1")
    monkeypatch.setenv("VRM_HA_SECRET", "short")
    monkeypatch.setenv("VRM_HA_PEERS", "host1:8470,nohost")
    with pytest.raises(ConfigError) as info:
        Settings.load()
    message = str(info.value)
    assert "ha_secret (VRM_HA_SECRET)" in message and "at least 32 bytes (got 5)" in message
    assert "ha_peers (VRM_HA_PEERS): 'nohost' is not host:port" in message
    monkeypatch.setenv("VRM_HA_SECRET", "s" * 32)
    monkeypatch.setenv("VRM_HA_PEERS", "host1:8470, host2:8471")
    monkeypatch.setenv("VRM_HA_ROLE", "standby")
    s = Settings.load()
    assert s.peers == ["host1:8470", "host2:8471"] and s.ha_role == "standby"
    assert "s" * 32 not in repr(s)  # the secret never shows in a dump


def test_ha_off_needs_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_HA_REPLICATION", "0")
    s = Settings.load()
    assert s.ha_replication is False and s.ha_secret is None


def test_nats_url_alias_and_node_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_NATS_URL", "nats://127.0.0.1:4222")
    assert Settings.load().nats.url == "nats://127.0.0.1:4222"
    # The section wins over the alias.
    s = Settings.load(write(tmp_path, '[nats]\nurl = "nats://hub:4222,nats://hub2:4222"\n'))
    assert s.nats.servers == ["nats://hub:4222", "nats://hub2:4222"]
    monkeypatch.delenv("VRM_NATS_URL")
    with pytest.raises(ConfigError, match=r"nats\.url: .*'http://hub' is not a NATS server"):
        Settings.load(write(tmp_path, '[nats]\nurl = "http://hub"\n'))
    with pytest.raises(ConfigError, match=r"node_name: 'a\.b' cannot name a node"):
        Settings.load(write(tmp_path, 'node_name = "a.b"\n'))
    assert Settings.load(write(tmp_path, 'node_name = "box-3090"\n')).node_name == "box-3090"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            '[[models]]\nname = "a"\nbackend = "ollama"\n'
            '[[models]]\nname = "a"\nbackend = "ollama"\n',
            "models.1.name: 'a' is declared twice",
        ),
        (
            '[gpu_manager]\nvlm_model = "ghost"\n',
            "gpu_manager.vlm_model: 'ghost' is not a configured model",
        ),
        (
            '[[models]]\nname = "a"\nbackend = "ollama"\n[gpu_manager]\nclip_model = "ghost"\n',
            r"gpu_manager.clip_model: 'ghost' is not a configured model \(models: a\)",
        ),
        ('[profiles.p]\nghost = "gpu"\n', "profiles.p.ghost: not a configured model"),
        (
            '[[models]]\nname = "a"\nbackend = "ollama"\nallowed_devices = ["gpu"]\n'
            '[profiles.p]\na = "cpu"\n',
            r"profiles.p.a: 'cpu', but the model's allowed_devices \['gpu'\] exclude it",
        ),
        ('[gpu_manager]\ninitial_profile = "nope"\n', "initial_profile: 'nope' is not a profile"),
        (
            '[[models]]\nname = "v"\nbackend = "ollama"\n'
            '[gpu_manager]\nvlm_model = "v"\nbuiltin_profiles = false\n'
            'initial_profile = "recording"\n',
            r"'recording' is not a profile \(profiles: idle\)",
        ),
    ],
)
def test_cross_section_problems_stop_loading_and_name_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(write(tmp_path, toml), data_dir=tmp_path)


def test_every_cross_section_problem_is_listed_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(data_dir=tmp_path, gpu_manager={"vlm_model": "v", "clip_model": "c"})
    lines = str(info.value).splitlines()
    assert any(line.strip().startswith("gpu_manager.vlm_model:") for line in lines)
    assert any(line.strip().startswith("gpu_manager.clip_model:") for line in lines)


def test_profiles_that_name_configured_models_load(tmp_path: Path) -> None:
    s = Settings.load(
        write(
            tmp_path,
            '[[models]]\nname = "v"\nbackend = "ollama"\n'
            '[[models]]\nname = "c"\nbackend = "ollama"\n'
            '[gpu_manager]\nvlm_model = "v"\nclip_model = "c"\ninitial_profile = "autopilot"\n'
            '[profiles.mine]\nv = "gpu"\nc = "cpu"\n',
        ),
        data_dir=tmp_path,
    )
    assert s.gpu_manager.initial_profile == "autopilot" and set(s.profiles) == {"mine"}


def test_a_built_in_profile_is_a_valid_initial_profile_before_any_model_is_named(
    tmp_path: Path,
) -> None:
    """``profile set recording`` works on a fresh configuration; so does starting in it."""
    s = Settings.load(
        write(tmp_path, '[gpu_manager]\ninitial_profile = "recording"\n'), data_dir=tmp_path
    )
    assert s.gpu_manager.initial_profile == "recording"


def test_the_builtin_profile_names_are_the_model_managers() -> None:
    from vramancer.config import BUILTIN_PROFILES
    from vramancer.models.registry import IDLE, builtin_profiles
    from vramancer.models.settings import GpuManagerSettings

    assert set(builtin_profiles(GpuManagerSettings(vlm_model="v"))) == set(BUILTIN_PROFILES)
    assert BUILTIN_PROFILES[0] == IDLE


def test_a_problem_inside_a_json_variable_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VRM_MODELS", '[{"name": "x", "backend": "ollama", "varm": "1GiB"}]')
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert info.value.message.splitlines()[1:] == [
        "  VRM_MODELS (at 0.varm): unknown key; did you mean models.0.vram?"
    ]
