"""Config: YAML with `defaults:` inheritance + overrides, validated into one `MasterConfig`."""

from cipo_nemo.config.loader import ConfigError, load_config, resolve, to_yaml
from cipo_nemo.config.schema import MasterConfig

__all__ = ["ConfigError", "MasterConfig", "load_config", "resolve", "to_yaml"]
