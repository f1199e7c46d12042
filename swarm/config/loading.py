"""Fill the config tree from YAML, ``SWARM_*`` environment variables and ``--set`` overrides.

Precedence, lowest first: defaults, the YAML file, environment variables, ``--set`` overrides.
Environment variables name a key as ``SWARM_<SECTION>_<KEY>`` (``SWARM_DATA_PATH``,
``SWARM_NETWORK_INITIAL_PEERS``, ``SWARM_PEER_DISPLAY_NAME``) or ``SWARM_<KEY>`` for top-level keys
(``SWARM_RUN_ID``). An environment variable that names no key is ignored with a warning (a Kubernetes
service named ``swarm`` injects ``SWARM_SERVICE_HOST``), unless it is a near miss of a key's name: a
typo such as ``SWARM_TRAINING_BATCHSIZE`` is refused with the name it probably meant.

Values are typed by the schema (:func:`typed_value`): a text field (a string, a path, a choice of
words) gets the text as written, so ``peer.display_name=2024`` is the string "2024" and ``=yes`` stays
"yes"; numbers, booleans, lists and sections are read as YAML, so ``5``, ``true`` and ``null`` mean
what they say there. An empty value, or ``null`` for a text field that may be null, unsets it.
"""

from __future__ import annotations

import difflib
import logging
import os
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ValidationError

from swarm.config.schema import SwarmConfig, section_model
from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "SWARM_"
# Environment variables that are read elsewhere and are not config keys.
RESERVED_ENV = {"SWARM_LOGLEVEL", "SWARM_HIVEMIND_LOGLEVEL", "SWARM_CONFIG", "SWARM_STATUS_FILE"}
# How alike (difflib's ratio) an unknown SWARM_* name must be to a key's variable to count as its typo;
# Kubernetes' SWARM_SERVICE_HOST, SWARM_PORT_8470_TCP_ADDR and the like stay well below it.
TYPO_CUTOFF = 0.85
_warned: set[str] = set()  # unknown variables already warned about: the tree is built more than once


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
        _assign(tree, dotted.strip(), typed_value(dotted.strip(), raw))
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


def typed_value(dotted: str, raw: str) -> Any:
    """The value of ``--set dotted=raw`` (or its ``SWARM_*`` variable), typed by the field's schema:
    the raw text for a text field, YAML for anything else; validation then checks it."""
    if raw.strip() == "":
        return None
    annotation = _annotation_at(dotted.split("."))
    if annotation is not None and _is_text(annotation):
        if raw.strip() == "null" and _may_be_none(annotation):
            return None
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _annotation_at(loc: Sequence[str]):
    """The type annotation of the field at ``loc``, or None if no field is there."""
    model: Optional[type[BaseModel]] = SwarmConfig
    annotation = None
    for part in loc:
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        annotation = field.annotation
        model = section_model(annotation)
    return annotation


def _is_text(annotation) -> bool:
    """A string, a path or a choice of words (optionally null): what a user writes as plain text."""
    if annotation in (str, Path):
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(annotation))
    if origin is Union:
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return bool(options) and all(_is_text(option) for option in options)
    return False


def _may_be_none(annotation) -> bool:
    return typing.get_origin(annotation) is Union and type(None) in typing.get_args(annotation)


def env_names() -> dict[str, str]:
    """Every config key's environment variable, mapped to its dotted key."""
    names = {}
    for name, field in SwarmConfig.model_fields.items():
        section = section_model(field.annotation)
        if section is None:
            names[ENV_PREFIX + name.upper()] = name
        else:
            for key in section.model_fields:
                names[f"{ENV_PREFIX}{name}_{key}".upper()] = f"{name}.{key}"
    return names


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    found = []
    known = env_names()
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        dotted = known.get(name)
        if dotted is None:
            _unknown_env(name, known)
            continue
        found.append((dotted, typed_value(dotted, environ[name])))
    return found


def _unknown_env(name: str, known: Mapping[str, str]) -> None:
    """Refuse a near miss of a key's variable (a typo); warn once about any other and ignore it."""
    close = difflib.get_close_matches(name, [*known, *RESERVED_ENV], n=1, cutoff=TYPO_CUTOFF)
    if close:
        raise ConfigError(f"environment variable {name} names no config key; did you mean {close[0]}?")
    if name not in _warned:
        _warned.add(name)
        logger.warning(f"warning: environment variable {name} names no config key; ignored "
                       f"(config keys are SWARM_<SECTION>_<KEY>, e.g. SWARM_DATA_PATH)")


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
