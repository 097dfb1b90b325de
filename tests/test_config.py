"""Typed settings: a frozen object per section whose fields carry their types, defaults and help, and an open
read-only [prices] mapping."""

from __future__ import annotations

import dataclasses
from typing import get_type_hints

import pytest

from mjctl.config import SCHEMA, SECTIONS, Prices, load_settings


def test_values_from_strings_take_the_type_of_their_field(tmp_path):
    env = {"MJCTL_POLLER_INTERVAL": "3", "MJCTL_SERVER_PORT": "81", "MJCTL_POLLER_IN_SERVER": "off",
           "MJCTL_IMAGES_TIMEOUT": "7", "MJCTL_DATABASE_POOL_TIMEOUT": "2"}
    conf = tmp_path / "mjctl.toml"
    conf.write_text("[poller]\nrequest_timeout = 4\n[database]\nbusy_timeout = 1\n")  # integers for numbers
    settings = load_settings(str(conf), {("server", "threads"): "3"}, environ=env)
    for name, cls in SECTIONS.items():
        section = getattr(settings, name)
        if cls is Prices:
            assert all(type(quota) is int for quota in section.values())
            continue
        assert type(section) is cls
        for key, typ in get_type_hints(cls).items():
            assert type(getattr(section, key)) is typ, f"[{name}] {key}"
            default, schema_type, help_text = SCHEMA[name][key]
            assert schema_type is typ and help_text, f"[{name}] {key} has its type and help in one place"
    assert (settings.poller.interval, settings.server.port, settings.poller.in_server, settings.server.threads,
            settings.poller.request_timeout) == (3.0, 81, False, 3, 4.0)
    assert settings.sources[("server", "threads")] == "option"
    assert settings.sources[("poller", "interval")] == "env MJCTL_POLLER_INTERVAL"


def test_a_section_is_frozen_and_replaced_whole(tmp_path):
    settings = load_settings(None, {("server", "port"): 9000})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.port = 1  # type: ignore[misc]
    before = settings.server
    settings.server = dataclasses.replace(settings.server, port=9001)
    assert settings.server.port == 9001 and before.port == 9000
    assert settings.server.secret_file == before.secret_file == str(tmp_path / "mjctl.secret")


def test_prices_are_an_open_read_only_mapping(tmp_path):
    conf = tmp_path / "mjctl.toml"
    conf.write_text('[prices]\nimagine = 7\nfoo = 3\ndefault = 5\n')
    settings = load_settings(str(conf), environ={"MJCTL_PRICES_BAR": "4"})
    prices = settings.prices
    assert list(prices)[:2] == ["default", "IMAGINE"] and list(prices)[-2:] == ["FOO", "BAR"]
    assert (prices["IMAGINE"], prices["FOO"], prices["BAR"], prices["UPSCALE"]) == (7, 3, 4, 500)
    assert settings.price("imagine") == 7 and settings.price("never-priced") == 5 == prices["default"]
    with pytest.raises(TypeError):
        prices["FOO"] = 1  # type: ignore[index]
    assert settings.sources[("prices", "FOO")] == f"file {conf}"
    assert Prices()["default"] == SCHEMA["prices"]["default"][0] == 1000


@pytest.mark.parametrize(("source", "value"), [("env", "nan"), ("env", "inf"), ("toml", "inf"), ("toml", "nan")])
def test_a_number_setting_must_be_finite(tmp_path, source, value):
    from mjctl.config import ConfigError

    conf = tmp_path / "mjctl.toml"
    conf.write_text(f"[server]\nheader_timeout = {value}\n" if source == "toml" else "")
    env = {"MJCTL_SERVER_HEADER_TIMEOUT": value} if source == "env" else {}
    with pytest.raises(ConfigError, match=r"\[server\] header_timeout must be a finite number"):
        load_settings(str(conf), {}, environ=env)
