"""Fill the config tree from YAML, ``SWARM_*`` environment variables and ``--set`` overrides.

Precedence, lowest first: defaults, the YAML file, environment variables, ``--set`` overrides.
Environment variables name a key as ``SWARM_<SECTION>_<KEY>`` (``SWARM_DATA_PATH``,
``SWARM_NETWORK_INITIAL_PEERS``, ``SWARM_PEER_DISPLAY_NAME``) or ``SWARM_<KEY>`` for top-level keys
(``SWARM_RUN_ID``). Values are read as YAML scalars, so ``5``, ``true`` and ``null`` mean what they say.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from swarm.config.schema import SwarmConfig, section_model
from swarm.errors import ConfigError

ENV_PREFIX = "SWARM_"
# Environment variables that are read elsewhere and are not config keys.
RESERVED_ENV = {"SWARM_LOGLEVEL", "SWARM_HIVEMIND_LOGLEVEL", "SWARM_CONFIG", "SWARM_STATUS_FILE"}


def load_config(
    path: Optional[Path] = None,
    overrides: Sequence[str] = (),
    environ: Optional[Mapping[str, str]] = None,
) -> SwarmConfig:
    """Build a validated :class:`SwarmConfig`.

    :param path: YAML file; None means defaults only. ``SWARM_CONFIG`` names one when path is None.
    :param overrides: ``section.key=value`` strings, applied last.
    :param environ: environment to read ``SWARM_*`` variables from (default: ``os.environ``).
    :raises ConfigError: one line naming the bad key and what is accepted.
    """
    tree = config_tree(path, overrides, environ)
    try:
        return SwarmConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def config_tree(
    path: Optional[Path] = None,
    overrides: Sequence[str] = (),
    environ: Optional[Mapping[str, str]] = None,
) -> dict:
    """The keys this peer sets itself, not yet validated: the YAML file, ``SWARM_*`` and ``--set``
    (what :func:`load_config` validates, and what a run's manifest is checked against)."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("SWARM_CONFIG"):
        path = Path(environ["SWARM_CONFIG"])
    tree = _read_yaml(path) if path is not None else {}
    for dotted, value in _env_overrides(environ):
        _assign(tree, dotted, value)
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _assign(tree, dotted.strip(), _parse_scalar(raw))
    return tree


def dump_config(config: SwarmConfig) -> str:
    """The resolved config as YAML, loadable again with :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, joined by '; ', each naming the dotted key and what is accepted."""
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"] if not isinstance(part, int)]
        key = ".".join(loc) or "<root>"
        if item["type"] == "extra_forbidden":
            accepted = ", ".join(_fields_at(loc[:-1]))
            problems.append(f"unknown key '{key}' (accepted here: {accepted})")
        elif item["type"] == "literal_error":
            problems.append(f"{key}: {item['msg'].removeprefix('Input should be ')}, got {item['input']!r}")
        elif item["type"] == "value_error":  # our own validators write complete messages
            message = item["msg"].removeprefix("Value error, ")
            problems.append(message if f"{key}." in message else f"{key}: {message}")
        else:
            shown = item.get("input")
            suffix = f" (got {shown!r})" if isinstance(shown, (str, int, float, bool)) else ""
            problems.append(f"{key}: {item['msg']}{suffix}")
    return "config error: " + "; ".join(problems)


def _read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(tree).__name__}")
    return tree


def _parse_scalar(raw: str) -> Any:
    if raw.strip() == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    found = []
    sections = {name for name, field in SwarmConfig.model_fields.items() if section_model(field.annotation)}
    top_level = set(SwarmConfig.model_fields) - sections
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        key = name[len(ENV_PREFIX):].lower()
        dotted = None
        if key in top_level:
            dotted = key
        else:
            for section in sections:
                if key.startswith(section + "_") and key[len(section) + 1:] in _fields_at([section]):
                    dotted = f"{section}.{key[len(section) + 1:]}"
        if dotted is None:
            raise ConfigError(
                f"environment variable {name} names no config key "
                f"(use SWARM_<SECTION>_<KEY>, e.g. SWARM_DATA_PATH; sections: {', '.join(sorted(sections))})"
            )
        found.append((dotted, _parse_scalar(environ[name])))
    return found


def _assign(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _fields_at(loc: Sequence[str]) -> list[str]:
    model: Optional[type[BaseModel]] = SwarmConfig
    for part in loc:
        field = model.model_fields.get(part) if model is not None else None
        model = section_model(field.annotation) if field is not None else None
    return sorted(model.model_fields) if model is not None else []
