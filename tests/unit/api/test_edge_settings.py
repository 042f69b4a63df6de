"""The ``[server]`` keys of the HTTP edge: how they read, and what a bad value says."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramancer.cli.serve import forwarded_allow_ips
from vramancer.config import Settings
from vramancer.errors import ConfigError


def load(tmp_path: Path, server: str) -> Settings:
    config = tmp_path / "c.toml"
    config.write_text("[server]\n" + server)
    return Settings.load(config, data_dir=tmp_path / "data")


def test_defaults(tmp_path: Path) -> None:
    server = Settings(data_dir=tmp_path).server
    assert server.max_json_body == 1024 * 1024
    assert server.max_body == 256 * 1024 * 1024
    assert server.allowed_hosts == [] and server.trusted_proxies == []
    assert (server.max_event_streams, server.max_event_streams_per_client) == (64, 16)
    assert server.event_stream_write_timeout_s == 10.0


def test_allowed_hosts_are_compared_in_one_form(tmp_path: Path) -> None:
    settings = load(tmp_path, 'allowed_hosts = ["GPU-Box.lan.", "[::1]", "10.0.0.7", "*"]\n')
    assert settings.server.allowed_hosts == ["gpu-box.lan", "::1", "10.0.0.7", "*"]
    assert load(tmp_path, 'max_json_body = "64KiB"\n').server.max_json_body == 65536


@pytest.mark.parametrize("entry", ["http://box.lan", "box.lan:8470", "box.lan/x", "", "a b"])
def test_an_allowed_host_with_a_scheme_port_or_path_is_refused(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f'allowed_hosts = ["{entry}"]\n')
    assert "server.allowed_hosts: " in err.value.message
    assert "is not a host name or address" in err.value.message


def test_trusted_proxies_are_addresses_or_networks(tmp_path: Path) -> None:
    settings = load(tmp_path, 'trusted_proxies = ["10.0.0.5", "10.1.0.0/16", "::1"]\n')
    assert forwarded_allow_ips(settings) == ["10.0.0.5", "10.1.0.0/16", "::1"]
    assert forwarded_allow_ips(Settings(data_dir=tmp_path)) is None  # headers not believed
    with pytest.raises(ConfigError) as err:
        load(tmp_path, 'trusted_proxies = ["proxy.lan"]\n')
    assert "server.trusted_proxies" in err.value.message
    assert "'proxy.lan' is not an IP address or CIDR network" in err.value.message
