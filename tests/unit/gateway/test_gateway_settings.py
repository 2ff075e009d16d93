"""GatewaySettings: defaults, environment parsing, checks that name the variable, deadlines."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.config import GatewaySettings
from histoxplain_service.config import Settings


def test_defaults_listen_on_loopback_50051_with_torchserve() -> None:
    settings = GatewaySettings.from_env({}, core=Settings())
    assert (settings.host, settings.port, settings.backend) == ("127.0.0.1", 50051, "torchserve")
    assert settings.address == "127.0.0.1:50051"
    assert settings.torchserve_key_file is None


def test_environment_overrides_every_gateway_field() -> None:
    env = {
        "HISTOXPLAIN_HOST": "0.0.0.0",
        "HISTOXPLAIN_PORT": "6000",
        "HISTOXPLAIN_BACKEND": "Embedded",
        "HISTOXPLAIN_TORCHSERVE_ADDRESS": "127.0.0.1:9999",
        "HISTOXPLAIN_TORCHSERVE_KEY_FILE": "/run/ts/key_file.json",
        "HISTOXPLAIN_TORCHSERVE_MODEL": "lite0",
        "HISTOXPLAIN_MAX_MESSAGE_MB": "8",
        "HISTOXPLAIN_DEFAULT_DEADLINE_S": "5",
        "HISTOXPLAIN_MAX_DEADLINE_S": "7.5",
        "HISTOXPLAIN_MAX_K": "50",
        "HISTOXPLAIN_MAX_EXPLAIN_K": "20",
        "HISTOXPLAIN_WORKER_THREADS": "2",
        "HISTOXPLAIN_GRACE_PERIOD_S": "0",
        "HISTOXPLAIN_HEALTH_INTERVAL_S": "0.5",
    }
    settings = GatewaySettings.from_env(env, core=Settings())
    assert settings.address == "0.0.0.0:6000"
    assert settings.backend == "embedded"
    assert settings.torchserve_address == "127.0.0.1:9999"
    assert settings.torchserve_key_file == Path("/run/ts/key_file.json")
    assert settings.torchserve_model == "lite0"
    assert settings.max_message_bytes == 8 * 1024 * 1024
    assert (settings.default_deadline_s, settings.max_deadline_s) == (5.0, 7.5)
    assert (settings.max_k, settings.max_explain_k, settings.worker_threads) == (50, 20, 2)
    assert (settings.grace_period_s, settings.health_interval_s) == (0.0, 0.5)


def test_core_settings_are_read_from_the_same_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HISTOXPLAIN_DATA", str(tmp_path))
    assert GatewaySettings.from_env({}).core.data_dir == tmp_path


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HISTOXPLAIN_PORT", "http"),
        ("HISTOXPLAIN_PORT", "70000"),
        ("HISTOXPLAIN_BACKEND", "triton"),
        ("HISTOXPLAIN_MAX_K", "0"),
        ("HISTOXPLAIN_MAX_DEADLINE_S", "-1"),
        ("HISTOXPLAIN_WORKER_THREADS", "many"),
        ("HISTOXPLAIN_DEFAULT_DEADLINE_S", "900"),  # above the maximum (300 s)
    ],
)
def test_bad_values_fail_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(InvalidRequest, match=variable):
        GatewaySettings.from_env({variable: value}, core=Settings())


def test_deadline_is_the_smaller_of_client_and_maximum() -> None:
    settings = GatewaySettings(core=Settings(), default_deadline_s=10.0, max_deadline_s=30.0)
    assert settings.deadline_for(None) == 10.0
    assert settings.deadline_for(2.5) == 2.5
    assert settings.deadline_for(3600.0) == 30.0
    assert settings.deadline_for(-1.0) == 0.0


def test_ipv6_host_is_bracketed() -> None:
    assert GatewaySettings(core=Settings(), host="::1", port=1).address == "[::1]:1"
