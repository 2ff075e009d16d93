"""The PACS indexing helpers that need no PACS: the watcher's state file (durable, atomic, refused
when foreign), the Orthanc trigger's configuration and backoff, and the configuration
OrthancConfig writes for it. The polling and the trigger against a real Orthanc and gateway:
tests/integration/test_pacs_trigger.py."""

from __future__ import annotations

import json
import stat
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.pacs.orthanc import TRIGGER_SCRIPT, OrthancConfig
from histoxplain_service.pacs.orthanc_trigger import METADATA, TriggerOptions, backoff_s
from histoxplain_service.pacs.watch import WatchState


def test_state_round_trips_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "watch.json"
    state = WatchState.load(path, since="20261201")
    assert (state.done, state.since, state.cursor) == ({}, "20261201", 0)
    state.mark("1.2.3", ["1.2.3.4", "1.2.3.5"])
    state.mark("1.2.3", ["1.2.3.4", "1.2.3.6"])
    state.cursor = 7
    state.save()
    again = WatchState.load(path)
    assert again.done == {"1.2.3": ["1.2.3.4", "1.2.3.5", "1.2.3.6"]}
    assert (again.since, again.cursor) == ("20261201", 7)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds UIDs
    assert WatchState.load(path, since="20250101").since == "20250101"  # --since replaces the remembered day
    assert sorted(p.name for p in path.parent.iterdir()) == ["watch.json"]  # no temporary file left


def test_a_failed_save_keeps_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "watch.json"
    state = WatchState.load(path)
    state.mark("1.2.3", ["1.2.3.4"])
    state.save()
    before = path.read_bytes()
    state.mark("1.2.3", [object()])  # type: ignore[list-item]  # not JSON: the write fails half-way
    with pytest.raises(TypeError):
        state.save()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["watch.json"]


@pytest.mark.parametrize("content", ["not json", "[]", '{"version": 99, "done": {}}', '{"version": 1}'])
def test_a_foreign_state_file_is_refused_without_its_content(tmp_path: Path, content: str) -> None:
    path = tmp_path / "watch.json"
    path.write_text(content)
    with pytest.raises(InvalidRequest, match="not a pacs-watch state file") as error:
        WatchState.load(path)
    assert content not in str(error.value)


def _configuration(**section: object) -> dict:
    return {"UserMetadata": {METADATA: 4501}, "Histoxplain": {"Gateway": "gw:50051", "Index": "slides", **section}}


def test_trigger_options_from_orthanc_configuration_and_environment() -> None:
    options = TriggerOptions.from_configuration(
        _configuration(Level=2, TokenFile="/run/token", RootCertificates="/run/ca.pem", SitePackages=["/opt/hx"]), {}
    )
    assert (options.gateway, options.index, options.level) == ("gw:50051", "slides", 2)
    assert (options.token_file, options.root_certificates, options.site_packages) == ("/run/token", "/run/ca.pem", ("/opt/hx",))
    from_env = TriggerOptions.from_configuration(
        {"UserMetadata": {METADATA: 4501}},
        {"HISTOXPLAIN_TRIGGER_GATEWAY": "env:1", "HISTOXPLAIN_TRIGGER_INDEX": "envidx",
         "HISTOXPLAIN_TRIGGER_TOKEN_FILE": "/t"},
    )
    assert (from_env.gateway, from_env.index, from_env.token_file) == ("env:1", "envidx", "/t")


@pytest.mark.parametrize(
    ("configuration", "message"),
    [
        ({"UserMetadata": {METADATA: 4501}}, "Gateway and Histoxplain.Index"),
        (_configuration(Level=-1), "Level"),
        (_configuration(MaxAttempts=0), "MaxAttempts"),
        (_configuration(InitialBackoffSeconds=5, MaxBackoffSeconds=1), "InitialBackoffSeconds"),
        ({"Histoxplain": {"Gateway": "gw:1", "Index": "x"}}, "UserMetadata"),
    ],
)
def test_trigger_options_refuse_a_bad_configuration(configuration: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TriggerOptions.from_configuration(configuration, {})


def test_backoff_doubles_up_to_its_cap() -> None:
    options = TriggerOptions.from_configuration(_configuration(InitialBackoffSeconds=0.5, MaxBackoffSeconds=3), {})
    assert [backoff_s(options, attempt) for attempt in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_orthanc_config_loads_the_trigger_and_the_script_reads_the_same_options_back(tmp_path: Path) -> None:
    given = TriggerOptions(
        "127.0.0.1:5", "slides", level=1, token_file=str(tmp_path / "token"), root_certificates="/run/ca.pem",
        max_attempts=3, initial_backoff_s=0.5, max_backoff_s=4.0, timeout_s=30.0, queue_size=7,
    )
    config = OrthancConfig(storage=tmp_path, trigger=given).as_json()
    assert config["Plugins"][-1].endswith("libOrthancPython.so")
    assert config["PythonScript"] == str(TRIGGER_SCRIPT) and TRIGGER_SCRIPT.is_file()
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    read = TriggerOptions.from_configuration(json.loads(json.dumps(config)), {})
    # none given: this interpreter's packages (the script runs in the system's python3)
    assert read == replace(given, site_packages=(sysconfig.get_paths()["purelib"],))
    assert "PythonScript" not in OrthancConfig(storage=tmp_path).as_json()
