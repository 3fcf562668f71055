"""Load YAML with `defaults:` inheritance and command-line overrides into one validated `MasterConfig`.

Precedence, lowest to highest: the `defaults:` parents (in the order listed, each resolved recursively), the
file itself, then the command-line overrides in order. Dicts merge key by key (child wins); lists and scalars
are replaced whole. OmegaConf does the merging and `${...}` interpolation; pydantic does the validation.

Overrides are parsed with Hydra's override grammar: `key.sub=value` changes an existing key, `+key=value` adds a
key that must not exist yet, `++key=value` adds or changes, `~key` deletes (`~key=value`: only if it holds that
value). Values are typed as Hydra types them (`1e-6`, `[1, 2]`, `{a: 1}`, `null`, `true`); a value holding spaces
next to braces, brackets, commas or `: ` is quoted: `cipo.templates.math='{problem} ... {attempt}'`.

Every leaf key remembers the file (or "command line") that set it last, so a validation error can say where
the offending value came from: one line per problem, `<source>: <key>: <what is wrong> (got <value>)`.
"""

from __future__ import annotations

import difflib
import functools
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
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_MISSING_INTERPOLATION_KEY = re.compile(r"Interpolation key '([^']+)' not found")


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

    def forget(self, key: str) -> None:
        """`key` was replaced or deleted: forget the sources of it, the keys below it and the leaves above it."""
        ancestors = {".".join(key.split(".")[:depth]) for depth in range(1, key.count(".") + 1)}
        for known in [k for k in self.sources if k == key or k.startswith(key + ".") or k in ancestors]:
            del self.sources[known]

    def knows(self, key: str) -> bool:
        return key in self.sources or any(k.startswith(key + ".") for k in self.sources)

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


@functools.cache
def _override_parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser  # imported on first use: antlr

    return OverridesParser.create()


def parse_override(text: str) -> Any:
    """Hydra's `Override` for one command-line word, or a ConfigError saying what is wrong with it."""
    from hydra.errors import HydraException

    try:
        override = _override_parser().parse_override(text)
    except HydraException as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} is not of the form key.sub=value ({reason}); quote a "
                          f"value that holds braces, brackets, commas or ': ', e.g. key='{{problem}} {{attempt}}'") from None
    key = override.key_or_group
    if not key:
        raise ConfigError(f"{COMMAND_LINE}: override {text!r} names no key; expected key.sub=value")
    if "/" in key or override.package is not None:
        raise ConfigError(f"{COMMAND_LINE}: override {text!r}: config groups and @packages are not supported; "
                          "set keys: key.sub=value")
    if override.is_sweep_override():
        raise ConfigError(f"{COMMAND_LINE}: override {text!r}: {key}: a sweep is not supported (one run per command); "
                          f"quote a value that holds commas: {key}='a,b'")
    return override


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], provenance: Provenance) -> DictConfig:
    """Apply `key=value`, `+key=value`, `++key=value` and `~key[=value]` overrides in order."""
    from hydra.core.override_parser.types import OverrideType

    for text in overrides:
        override = parse_override(text)
        key = override.key_or_group
        exists = _select(cfg, key) is not _ABSENT
        if override.type == OverrideType.DEL:
            _delete(cfg, key, override, provenance)
            continue
        if override.type == OverrideType.CHANGE and not exists:
            hint = _close_keys(key, provenance)
            raise ConfigError(f"{COMMAND_LINE}: {key}: no such key{hint}; use ++{key}=... to add a key")
        if override.type == OverrideType.ADD and exists:
            raise ConfigError(f"{COMMAND_LINE}: {key}: already set; use {key}=... or ++{key}=... to change it")
        value = override.value()
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{COMMAND_LINE}: {key}: cannot set it: {' '.join(str(err).split())}") from None
        provenance.forget(key)  # the value replaces what was there, including a scalar on the way to key
        provenance.record(value, COMMAND_LINE, key)
    return cfg


def _select(cfg: DictConfig, key: str) -> Any:
    """The value at `key` (interpolations left unresolved), or _ABSENT."""
    try:
        node = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False, throw_on_resolution_failure=False)
    except OmegaConfBaseException:  # a path through a scalar or a list
        return _ABSENT
    return node


def _delete(cfg: DictConfig, key: str, override: Any, provenance: Provenance) -> None:
    current = _select(cfg, key)
    if current is _ABSENT:
        raise ConfigError(f"{COMMAND_LINE}: ~{key}: no such key{_close_keys(key, provenance)}")
    if override.value_type is not None:  # `~key=value`: delete only if the key holds that value
        held = OmegaConf.to_container(current) if isinstance(current, (DictConfig, ListConfig)) else current
        if held != override.value():
            raise ConfigError(f"{COMMAND_LINE}: ~{key}={override.value()!r}: the key holds {held!r}")
    parent_key, _, name = key.rpartition(".")
    parent = _select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        raise ConfigError(f"{COMMAND_LINE}: ~{key}: only keys of a mapping can be deleted")
    del parent[name]
    provenance.forget(key)
    provenance.record(None, COMMAND_LINE, key)  # its absence now comes from the command line


def _close_keys(key: str, provenance: Provenance, exclude: str | None = None) -> str:
    known = [k for k in provenance.sources if k != exclude]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
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


def _blame(key: str, message: str, provenance: Provenance) -> str:
    """The source to name for a problem at `key`: the command line when it set `key`, or set a key the message
    names (a cross-field check fails at the file's key, but the command line's value caused it)."""
    own = provenance.source_of(key)
    if own == COMMAND_LINE:
        return own
    ancestors = [".".join(key.split(".")[:depth]) for depth in range(key.count(".") + 1, 0, -1)]
    for token in _IDENTIFIER.findall(message):
        for related in (token, *(f"{ancestor}.{token}" for ancestor in ancestors)):
            if provenance.knows(related) and provenance.source_of(related) == COMMAND_LINE:
                return f"{COMMAND_LINE} ({related}; {key} is from {own})"
    return own


def _describe(error: dict, provenance: Provenance) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "<top level>"
    source = _blame(key, str(error["msg"]), provenance)
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
        message = " ".join(str(err.msg).split("full_key:")[0].split())
        missing = _MISSING_INTERPOLATION_KEY.search(message)
        hint = _close_keys(missing.group(1), provenance, exclude=missing.group(1)) if missing else ""
        raise ConfigError(f"{_blame(key, message, provenance)}: {key}: cannot resolve interpolation: "
                          f"{message}{hint}") from None
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
