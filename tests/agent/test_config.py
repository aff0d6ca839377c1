"""Agent configuration: the happy path, every class of error (with its key path) and the password sources."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.config import AgentConfig, CameraConfig, ConfigError, RegionConfig, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "agent.example.toml"

FULL = """
device_id = "pi-kitchen"
prefix = "site/edgecv"
groups = ["kitchen", "floor-1"]
log_level = "debug"

[broker]
host = "mqtt.local"
port = 8883
protocol = "3.1.1"
keepalive = 60
username = "pi"
password_file = "secrets/mqtt"
reconnect_min_s = 1
reconnect_max_s = 10

[broker.tls]
enabled = true
ca_file = "ca.pem"

[[camera]]
name = "door"
source = "clips/door.avi"
loop = false
fps = 5

[[camera]]
name = "yard"
source = "rtsp://u:p@cam/stream"
open_timeout_s = 3

[model]
store = "store"
bundle = "/opt/seed.edgecv"
runtime = "onnxruntime"
threads = 2

[publish]
qos = 0
mode = "rate"
max_rate = 2.5
min_score = 0.3
top_k = 1

[motion]
enabled = true
threshold = 0.05

[update]
keep_versions = 5

[systemd]
watchdog_stall_s = 20
"""


def _config(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path)


def _error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    return str(info.value)


def test_full_config_parses_into_typed_frozen_objects(tmp_path: Path) -> None:
    cfg = _config(tmp_path, FULL)
    assert cfg.device_id == "pi-kitchen" and cfg.prefix == "site/edgecv"
    assert cfg.groups == ("kitchen", "floor-1") and cfg.log_level == "debug"
    assert cfg.broker.port == 8883 and cfg.broker.protocol == "3.1.1" and cfg.broker.tls.enabled
    assert cfg.broker.reconnect_min_s == 1.0 and isinstance(cfg.broker.reconnect_min_s, float)
    assert [c.name for c in cfg.cameras] == ["door", "yard"]
    assert cfg.cameras[0].fps == 5.0 and cfg.cameras[0].loop is False and cfg.cameras[1].open_timeout_s == 3.0
    assert cfg.camera("yard").source == "rtsp://u:p@cam/stream"
    assert cfg.model.runtime == "onnxruntime" and cfg.model.threads == 2
    assert cfg.publish.mode == "rate" and cfg.publish.max_rate == 2.5 and cfg.publish.top_k == 1
    assert cfg.motion.enabled and cfg.motion.threshold == 0.05
    assert cfg.update.keep_versions == 5 and cfg.update.probation_s == 60.0  # untouched keys keep defaults
    assert cfg.systemd.watchdog_stall_s == 20.0
    assert cfg.source == str(tmp_path / "agent.toml")
    with pytest.raises(AttributeError):
        cfg.device_id = "other"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    cfg = _config(tmp_path, FULL)
    assert cfg.broker.password_file == str(tmp_path / "secrets" / "mqtt")
    assert cfg.broker.tls.ca_file == str(tmp_path / "ca.pem")
    assert cfg.cameras[0].source == str(tmp_path / "clips" / "door.avi")
    assert cfg.model.store == str(tmp_path / "store")
    assert cfg.model.bundle == "/opt/seed.edgecv"  # absolute stays
    assert cfg.publish.spool_dir == ""  # empty means unset, not "."


def test_only_device_id_is_required() -> None:
    cfg = parse_config({"device_id": "d1"})
    assert cfg.prefix == "edgecv" and cfg.groups == () and cfg.broker.host == "127.0.0.1"
    assert cfg.cameras == (CameraConfig(),) and cfg.cameras[0].source == "synthetic:fashion-mnist"
    assert cfg.model.runtime == "auto" and cfg.publish.mode == "every" and cfg.homeassistant.enabled
    assert cfg.update.max_bundle_bytes == 64 * 1024 * 1024


def with_optional_blocks(text: str) -> str:
    """The example config with its optional blocks uncommented (one leading '#' removed from each line)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("# --- begin optional"):
            inside = True
        elif line.startswith("# --- end optional"):
            inside = False
        elif inside:
            line = line[1:] if line.startswith("#") else line
        out.append(line)
    return "\n".join(out) + "\n"


def test_example_config_is_valid_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.device_id == "pi-kitchen"
    # as installed, its values are the defaults
    assert cfg.to_dict() == {**parse_config({"device_id": "pi-kitchen"}).to_dict()}
    # with the optional camera uncommented it is valid too, and the two together document every key
    full = with_optional_blocks(EXAMPLE.read_text())
    example = tomllib.loads(full)
    full_cfg = parse_config(example)

    def keys(doc: Any, prefix: str = "") -> set[str]:
        if isinstance(doc, list) and doc and isinstance(doc[0], dict):  # arrays of tables: every key of any entry
            found = set().union(*(keys(entry, prefix) for entry in doc))
            return {k for k in found if not any(o != k and o.startswith(k) for o in found)}
        if not isinstance(doc, dict):
            return {prefix}
        return set().union(*(keys(v, f"{prefix}{k}.") for k, v in doc.items()))

    assert keys(example) == keys(full_cfg.to_dict())
    region = full_cfg.cameras[1].regions[0]
    assert region == RegionConfig(name=region.name, crop=region.crop)  # the region's other keys: the defaults


@pytest.mark.parametrize(("doc", "expected"), [
    ({"device_id": "d", "publish": {"mod": "every"}},
     "publish.mod: unknown key; did you mean 'mode'? (known keys: batch_max, buffer, expiry_s"),
    ({"device_id": "d", "broker": {"tls": {"verify": True}}}, "broker.tls.verify: unknown key; known keys: ca_file"),
    ({"device_id": "d", "camera": [{}, {"name": "b", "sourc": "x"}]},
     "camera[1].sourc: unknown key; did you mean 'source'?"),
    ({"device_id": "d", "cameras": []}, "cameras: unknown key; did you mean 'camera'? (known keys: "),
])
def test_unknown_keys_name_the_full_path(doc: dict[str, Any], expected: str) -> None:
    assert _error(doc).startswith(expected)


@pytest.mark.parametrize(("doc", "expected"), [
    ({"device_id": "d", "camera": [{"fps": "fast"}]}, "camera[0].fps: expected a number >= 0, got 'fast'"),
    ({"device_id": "d", "camera": [{"fps": -1}]}, "camera[0].fps: expected a number >= 0, got -1"),
    ({"device_id": "d", "broker": {"port": "1883"}}, "broker.port: expected an integer between 1 and 65535, "
                                                     "got '1883'"),
    ({"device_id": "d", "broker": {"port": 70000}}, "broker.port: expected an integer between 1 and 65535"),
    ({"device_id": "d", "broker": {"protocol": 5}}, "broker.protocol: expected one of '5' or '3.1.1', got 5"),
    ({"device_id": "d", "model": {"threads": 1.5}}, "model.threads: expected an integer >= 1, got 1.5"),
    ({"device_id": "d", "model": {"runtime": "tensorrt"}}, "model.runtime: expected one of 'auto'"),
    ({"device_id": "d", "update": {"allow_downgrade": True}},
     "update.allow_downgrade: expected one of 'when-asked' or 'never', got true"),
    ({"device_id": "d", "publish": {"qos": True}}, "publish.qos: expected one of 0 or 1 or 2, got true"),
    ({"device_id": "d", "publish": {"mode": "rate"}}, "publish.max_rate: expected a number > 0 when"),
    ({"device_id": "d", "motion": {"enabled": "yes"}}, "motion.enabled: expected true or false, got 'yes'"),
    ({"device_id": "d", "motion": {"threshold": 2}}, "motion.threshold: expected a number between 0 and 1"),
    ({"device_id": "d", "broker": "localhost"}, "broker: expected a table, got 'localhost'"),
    ({"device_id": "d", "groups": "kitchen"}, "groups: expected a list, got 'kitchen'"),
    ({"device_id": "d", "camera": []}, "camera: expected at least one [[camera]] table"),
    ({"device_id": "d", "camera": [{"name": "a"}, {"name": "a"}]}, "camera[1].name: expected a unique camera"),
    ({"device_id": "d", "broker": {"reconnect_min_s": 5, "reconnect_max_s": 1}}, "broker.reconnect_max_s: "),
    ({"device_id": "d", "broker": {"password_env": "X", "credential": "y"}}, "broker.credential: expected at "
                                                                              "most one password source"),
    ({"device_id": "d", "broker": {"tls": {"cert_file": "c.pem"}}}, "broker.tls.key_file: expected cert_file"),
    ({"device_id": 7}, "device_id: expected a string, got 7"),
])
def test_bad_types_and_values_name_path_expected_and_got(doc: dict[str, Any], expected: str) -> None:
    assert _error(doc).startswith(expected)


def test_missing_device_id_says_what_to_do() -> None:
    msg = _error({"prefix": "edgecv"})
    assert msg.startswith("device_id: required key is missing") and 'device_id = "' in msg


@pytest.mark.parametrize(("doc", "path"), [
    ({"device_id": "pi/kitchen"}, "device_id"),
    ({"device_id": "pi+"}, "device_id"),
    ({"device_id": "pi kitchen"}, "device_id"),
    ({"device_id": ""}, "device_id"),
    ({"device_id": "d", "groups": ["ok", "no#"]}, "groups[1]"),
    ({"device_id": "d", "prefix": "edge/+"}, "prefix"),
    ({"device_id": "d", "prefix": "edge//cv"}, "prefix"),
    ({"device_id": "d", "camera": [{"name": "front door"}]}, "camera[0].name"),
])
def test_topic_levels_are_validated(doc: dict[str, Any], path: str) -> None:
    msg = _error(doc)
    assert msg.startswith(f"{path}: expected") and "got" in msg


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not valid TOML"):
        _config(tmp_path, 'device_id = "x"\n[broker\n')
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config({"device_id": "d", "broker": {"password_env": "EDGECV_TEST_PW"}})
    monkeypatch.setenv("EDGECV_TEST_PW", "s3cret")
    assert cfg.broker.resolve_password() == "s3cret"
    monkeypatch.delenv("EDGECV_TEST_PW")
    with pytest.raises(ConfigError, match=r"broker\.password_env: environment variable EDGECV_TEST_PW is not set"):
        cfg.broker.resolve_password()


def test_password_from_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    cfg = _config(tmp_path, 'device_id = "d"\n[broker]\npassword_file = "pw"\n')
    assert cfg.broker.resolve_password() == "from-file"
    (tmp_path / "pw").unlink()
    with pytest.raises(ConfigError, match=r"broker\.password_file: cannot read"):
        cfg.broker.resolve_password()


def test_password_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("from-credential")
    cfg = parse_config({"device_id": "d", "broker": {"credential": "mqtt-password"}})
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        cfg.broker.resolve_password()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert cfg.broker.resolve_password() == "from-credential"
    assert parse_config({"device_id": "d"}).broker.resolve_password() is None
    assert _error({"device_id": "d", "broker": {"credential": "../etc/shadow"}}).startswith("broker.credential:")


def test_every_problem_is_reported_at_once_with_its_key_path() -> None:
    """Issue 13: config errors came one at a time. Now one ConfigError lists them all: unknown keys (with a "did you
    mean"), bad values in several sections and list entries, a bad choice, and the rules across keys of the sections
    that were valid on their own."""
    doc = {"device_id": "d", "brokr": {}, "log_level": "loud",
           "broker": {"port": 0, "reconnect_min_s": 5, "reconnect_max_s": 1},
           "camera": [{"name": "a", "fps": "fast"}, {"name": "b", "sorce": "x"}, {"name": "b"}],
           "model": {"runtime": "litrt"}, "publish": {"mode": "rate"}}
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="agent.toml")
    problems = info.value.problems
    paths = [p.split(": ", 1)[0] for p in problems]
    assert paths == ["brokr", "log_level", "broker.port", "camera[0].fps", "camera[1].sorce", "model.runtime",
                     "camera[2].name", "publish.max_rate"], problems
    text = str(info.value)
    assert text.startswith("agent.toml has 8 problems:\n  brokr: unknown key; did you mean 'broker'?")
    assert "camera[1].sorce: unknown key; did you mean 'source'?" in text
    assert "model.runtime: expected one of 'auto' or 'onnxruntime' or 'litert' or 'openvino', got 'litrt'; did you " \
           "mean 'litert'?" in text
    # broker.reconnect_max_s < min is not judged: the broker section already has a problem (its port)
    assert "reconnect_max_s" not in text


def test_a_single_problem_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"device_id": "d", "camera": [{"fps": -1}]})
    assert str(info.value) == "camera[0].fps: expected a number >= 0, got -1"
    assert info.value.problems == [str(info.value)]
