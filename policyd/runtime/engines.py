"""The one way a config file becomes a Config, and a Config an Engine."""
from __future__ import annotations

from .. import config as config_module
from ..config import Config
from ..dns import Resolver
from ..engine import Engine


def load_config(path: str | None) -> Config:
    """The file named, else /etc/policyd/policyd.yaml if present, else the
    embedded default.  Raises ConfigError."""
    resolved = config_module.resolve_path(path)
    return config_module.load(resolved) if resolved else config_module.embedded()


def build_engine(config: Config) -> Engine:
    return Engine(config, Resolver(config.dns))


def engine_for(config: Config, current: Engine) -> Engine:
    """An engine for a reloaded `config`: the DNS cache survives when the
    DNS settings did not change."""
    resolver = current.resolver if config.dns == current.config.dns else Resolver(config.dns)
    return Engine(config, resolver)


def reload_engine(path: str | None, current: Engine) -> Engine:
    """Parse and validate everything first, then hand back a new engine.
    Raises ConfigError and leaves `current` untouched on a bad file."""
    return engine_for(load_config(path), current)
