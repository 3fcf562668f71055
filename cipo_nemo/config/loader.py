"""Load YAML with `defaults:` inheritance and command-line overrides into one validated `MasterConfig`.

Precedence, lowest to highest: the `defaults:` parents (in the order listed, each resolved recursively), the
file itself, then the command-line overrides in order. Dicts merge key by key (child wins); lists and scalars
are replaced whole. OmegaConf does the merging and `${...}` interpolation; pydantic does the validation.

Overrides follow Hydra's syntax: `key.sub=value` changes an existing key, `+key=value` adds a key that must not
exist yet, `++key=value` adds or changes. Values are parsed as YAML (`1e-6`, `[1, 2]`, `null`, `true`).

Every leaf key remembers the file (or "command line") that set it last, so a validation error can say where
the offending value came from: one line per problem, `<source>: <key>: <what is wrong> (got <value>)`.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from cipo_nemo.config.schema import MasterConfig

DEFAULTS_KEY = "defaults"
COMMAND_LINE = "command line"
_OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+)?(?P<key>[A-Za-z_][\w\-]*(?:\.[\w\-]+)*)=(?P<value>.*)$", re.DOTALL)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the source, the key and the problem."""


@dataclass
class Provenance:
    """Which source (file path or 'command line') set each leaf key last."""

    sources: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (source, order of setting)
    _counter: int = 0

    def record(self, node: Any, source: str, prefix: str = "") -> None:
        for key in _leaf_keys(node, prefix):
            self._counter += 1
            self.sources[key] = (source, self._counter)

    def source_of(self, key: str) -> str:
        """The source of `key`, else of the latest-set leaf below it, else of its nearest ancestor."""
        if key in self.sources:
            return self.sources[key][0]
        below = [entry for k, entry in self.sources.items() if k.startswith(key + ".")]
        if below:
            return max(below, key=lambda entry: entry[1])[0]
        parent = key.rpartition(".")[0]
        return self.source_of(parent) if parent else "the resolved config"


def _leaf_keys(node: Any, prefix: str) -> list[str]:
    if isinstance(node, (DictConfig, dict)) and len(node) > 0:
        keys: list[str] = []
        for name in node.keys():
            child = node._get_node(name) if isinstance(node, DictConfig) else node[name]
            keys.extend(_leaf_keys(child, f"{prefix}.{name}" if prefix else str(name)))
        return keys
    return [prefix] if prefix else []


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(node).__name__}")
    return node


def _parent_paths(path: Path, node: DictConfig) -> list[Path]:
    parents = node.pop(DEFAULTS_KEY, None)
    if parents is None:
        return []
    names = [parents] if isinstance(parents, str) else list(parents) if isinstance(parents, ListConfig) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{path}: {DEFAULTS_KEY}: expected a file name or a list of file names, got {parents!r}")
    return [(path.parent / name).resolve() for name in names]


def _load_with_parents(path: Path, provenance: Provenance, chain: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: {DEFAULTS_KEY} form a cycle: {cycle}")
    node = _read_yaml(path)
    merged = OmegaConf.create({})
    for parent in _parent_paths(path, node):
        if not parent.is_file():
            raise ConfigError(f"{path}: {DEFAULTS_KEY}: parent config {parent} not found")
        merged = OmegaConf.merge(merged, _load_with_parents(parent, provenance, (*chain, path)))
    provenance.record(node, _display_path(path))
    return OmegaConf.merge(merged, node)


def _display_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


_ABSENT = object()


def _parse_override_value(raw: str) -> Any:
    # OmegaConf's YAML loader, unlike plain PyYAML, reads `1e-6` as a float.
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={raw}"]))["value"]


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], provenance: Provenance) -> DictConfig:
    """Apply Hydra-style `key=value`, `+key=value` and `++key=value` overrides in order."""
    for text in overrides:
        match = _OVERRIDE.match(text)
        if match is None:
            raise ConfigError(f"{COMMAND_LINE}: override {text!r} is not of the form key.sub=value")
        prefix, key, raw = match["prefix"], match["key"], match["value"]
        exists = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT
        if prefix is None and not exists:
            hint = _close_keys(key, provenance)
            raise ConfigError(f"{COMMAND_LINE}: {key}: no such key{hint}; use ++{key}=... to add a key")
        if prefix == "+" and exists:
            raise ConfigError(f"{COMMAND_LINE}: {key}: already set; use {key}=... or ++{key}=... to change it")
        value = _parse_override_value(raw)
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        provenance.record(OmegaConf.select(cfg, key), COMMAND_LINE, key)
    return cfg


def _close_keys(key: str, provenance: Provenance) -> str:
    close = difflib.get_close_matches(key, provenance.sources.keys(), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _schema_fields_at(path: Sequence[str | int]) -> list[str]:
    """Field names the schema allows at the model that holds `path`'s last element."""
    model: Any = MasterConfig
    for part in path[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X` or `X | None`, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _describe(error: dict, provenance: Provenance) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<top level>"
    source = provenance.source_of(key)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc[-1], _schema_fields_at(error["loc"]), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"{source}: {key}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{source}: {key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if isinstance(error["input"], (dict, list)):  # a whole section: the message names the field
        return f"{source}: {key}: {message}"
    return f"{source}: {key}: {message} (got {error['input']!r})"


def resolve(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, Provenance]:
    """Merge `path`, its parents and `overrides`; resolve interpolations. Returns a plain dict and provenance."""
    provenance = Provenance()
    cfg = _load_with_parents(Path(path), provenance)
    cfg = apply_overrides(cfg, overrides, provenance)
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"{provenance.source_of(key)}: {key}: cannot resolve interpolation: {err.msg}") from None
    return container, provenance


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> MasterConfig:
    """Load, merge, override, resolve and validate. Raises ConfigError naming every offending key."""
    container, provenance = resolve(path, overrides)
    try:
        return MasterConfig.model_validate(container)
    except ValidationError as err:
        raise ConfigError("\n".join(_describe(e, provenance) for e in err.errors())) from None


def to_yaml(cfg: MasterConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=120)
