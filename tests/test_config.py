import dataclasses
import sys
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from aggregator.keyholder import KeyHolderConfig
from edge_agent.config import AgentConfig
from fedmq.cli import build_parser
from fedmq.config import load_config
from fedmq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_toml_then_flags(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\nfleet = "farm"\ndevice_count = 4\nalpha = 1\n')
    config = load_config(AgentConfig, path, {"device_count": 8, "fleet": None})
    assert (config.device_id, config.fleet, config.device_count) == ("pi-1", "farm", 8)
    assert config.alpha == 1.0 and isinstance(config.alpha, float)


@pytest.mark.parametrize(("text", "match"), [
    ('devcie_id = "x"\n', "unknown key 'devcie_id'"),
    ("device_count = 'four'\n", "should be int"),
    ("fleet = 'a/b'\n", "not valid"),
    ("device_count = true\n", "should be int"),
    ("= broken", "not valid TOML"),
])
def test_bad_config_files_say_what_is_wrong(tmp_path, text, match):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(AgentConfig, path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(AgentConfig, "/nonexistent/agent.toml")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"min_updates": 0}, "min_updates"), ({"on_insufficient": "guess"}, "extend"),
    ({"lr": -1.0}, "learning rate"), ({"task": "cifar"}, "unknown task"),
])
def test_aggregator_config_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(AggregatorConfig, None, overrides)


def test_every_config_key_is_a_flag():
    args = build_parser().parse_args(
        ["aggregator", "--min-updates", "5", "--no-evaluate", "--optimizer", "fedadam"])
    config = load_config(AggregatorConfig, None, vars(args))
    assert (config.min_updates, config.evaluate, config.optimizer) == (5, False, "fedadam")


def test_shipped_example_configs_load():
    agent = load_config(AgentConfig, "deploy/agent.toml")
    aggregator = load_config(AggregatorConfig, "deploy/aggregator.toml")
    assert agent.device_id and aggregator.rounds == 0
    # production turns on what the defaults leave off for a first run (issue #17)
    assert aggregator.require_known_devices
    assert aggregator.adaptive_norm_factor and aggregator.max_sample_factor
    assert aggregator.max_model_growth


def test_the_shipped_key_holder_config_loads_with_every_key_where_install_sh_puts_files():
    """deploy/keyholder.toml sets every KeyHolderConfig key, so each is documented there;
    its key file and state are in the directories of install.sh's keyholder role."""
    config = load_config(KeyHolderConfig, "deploy/keyholder.toml")
    keys = set(tomllib.loads(Path("deploy/keyholder.toml").read_text()))
    assert keys == {field.name for field in dataclasses.fields(KeyHolderConfig)}
    assert config.he_secret_context == "/etc/fedmq-keyholder/he-secret.ctx"
    assert config.state == "/var/lib/fedmq-keyholder/keyholder.state"
    assert config.client_id == "fedmq-keyholder" and config.min_updates == 2
    assert config.metrics_port == 0 and config.metrics_bind == "127.0.0.1"


def test_a_key_set_twice_is_named_with_both_lines(tmp_path):
    """A `fedmq enroll` snippet pasted under the example config repeats its keys; tomllib
    says only "Cannot overwrite a value (at line N, column M)"."""
    path = tmp_path / "aggregator.toml"
    example = Path("deploy/aggregator.toml").read_text()
    path.write_text(example + '\n# pasted\nbroker = "mqtts://server:8883"\n')
    with pytest.raises(ConfigError) as info:
        load_config(AggregatorConfig, path)
    first = next(i for i, line in enumerate(example.splitlines(), 1)
                 if line.startswith("broker ="))
    message = str(info.value)
    assert str(path) in message and "sets broker twice" in message
    assert f"line {first} and again on line {len(example.splitlines()) + 3}" in message
    assert "fedmq enroll" in message and "--config" in message


def test_an_unreadable_config_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        load_config(AgentConfig, tmp_path)
