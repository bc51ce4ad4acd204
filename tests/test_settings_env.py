"""Settings from the environment (pydantic-settings): variable names, defaults, the errors a bad
value gives at start-up, secrets, and the effective settings a `doclora config` would print."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from services.common.config import MASK, Settings, SettingsError, effective_settings, settings_env


@pytest.fixture
def env(monkeypatch):
    """Set DOCLORA_* variables for one test; the others are cleared so the defaults show."""
    import os

    for name in [n for n in os.environ if n.startswith("DOCLORA_")]:
        monkeypatch.delenv(name)
    return lambda **values: [monkeypatch.setenv(f"DOCLORA_{k.upper()}", v) for k, v in values.items()]


def test_every_field_is_read_from_its_doclora_variable(env):
    """Each type through its variable; empty means the default; Settings() alone ignores the environment."""
    env(
        train_time_budget_s="12.5",
        gateway_port="9090",
        log_json="yes",
        embedded_s3="off",
        nats_url="nats://nats:4222",
        qagen_openai_key="sk-test",
        s3_secret_key="s3-test",
        train_seed="",
    )
    s = Settings.from_env()
    assert (s.train_time_budget_s, s.gateway_port, s.log_json, s.embedded_s3) == (12.5, 9090, True, False)
    assert s.nats_url == "nats://nats:4222" and s.train_seed == 1234
    assert s.qagen_openai_key.get_secret_value() == "sk-test"
    assert s.s3_secret_key.get_secret_value() == "s3-test"
    assert Settings() == Settings(gateway_port=8080) and Settings().gateway_port == 8080


@pytest.mark.parametrize("spelling", ["1", "true", "TRUE", "yes", "on"])
def test_booleans_accept_the_usual_spellings(env, spelling):
    env(inference_int8=spelling, embedded_nats="0")
    s = Settings.from_env()
    assert s.inference_int8 is True and s.embedded_nats is False


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DOCLORA_TRAIN_TIME_BUDGET_S", "abc", "a number"),
        ("DOCLORA_GATEWAY_PORT", "80x", "an integer"),
        ("DOCLORA_LOG_JSON", "maybe", "a boolean"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_expected_type(env, monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env()
    message = str(caught.value)
    assert f"{variable}='{value}'" in message and f"expected {expected}" in message


def test_secrets_are_masked_in_repr_and_in_the_effective_settings():
    s = Settings(
        s3_secret_key="very-secret-s3",
        qagen_openai_key="sk-very-secret",
        nats_url="nats://doclora:very-secret-nats@nats:4222",
    )
    assert isinstance(s.s3_secret_key, SecretStr)
    for text in (repr(s), str(s), str(effective_settings(s))):
        assert "very-secret-s3" not in text and "sk-very-secret" not in text
    shown = effective_settings(s)
    # a password written into a URL is masked as well; the child environment keeps it
    assert shown["DOCLORA_NATS_URL"] == f"nats://doclora:{MASK}@nats:4222"
    assert "very-secret-nats" in settings_env(s)["DOCLORA_NATS_URL"]
    assert shown["DOCLORA_S3_SECRET_KEY"] == shown["DOCLORA_QAGEN_OPENAI_KEY"] == MASK
    assert effective_settings(Settings())["DOCLORA_QAGEN_OPENAI_KEY"] == ""  # unset stays visible as unset
    assert shown["DOCLORA_TRAIN_TIME_BUDGET_S"] == "150.0" and shown["DOCLORA_LOG_JSON"] == "0"
    assert set(shown) == {"DOCLORA_" + name.upper() for name in Settings.model_fields}


def test_the_settings_round_trip_through_a_child_environment(env, monkeypatch):
    """settings_env reveals the secrets: a child process reading it with from_env sees the same settings."""
    s = Settings(s3_secret_key="child-secret", train_passages=True, train_lr=0.5, listen_addr="0.0.0.0:1")
    for name, value in settings_env(s).items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env() == s


def test_replace_validates_and_keeps_the_other_fields():
    """`Settings.replace` gives a new Settings: validated, the other fields kept, secrets secret."""
    s = Settings(train_seed=7)
    changed = s.replace(qagen_openai_key="k", base_model="m")
    assert isinstance(changed, Settings) and changed.train_seed == 7 and changed.base_model == "m"
    assert changed.qagen_openai_key.get_secret_value() == "k"
    with pytest.raises(ValueError):
        s.replace(gateway_port="not a port")
    with pytest.raises(ValueError):
        s.train_seed = 8  # frozen
    assert hash(s) == hash(Settings(train_seed=7))
