"""The configuration reference (``docs/configuration.md``), rendered from the schema itself.

The schema is the one source: every key, its type, default, bounds and description come from the
pydantic models of :mod:`swarm.config.schema`, so the reference cannot drift from what the loader
accepts (``tests/test_config_reference.py`` fails when the file is not what :func:`render` makes;
``make docs`` writes it).
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MaxLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from swarm.config.schema import SwarmConfig, section_model

HEADER = """# Configuration reference

<!-- Generated from swarm/config/schema.py by `make docs`; tests/test_config_reference.py checks it. -->

One typed tree. Values apply in this order, later ones winning: the defaults below, `--config FILE.yaml`
(or `$SWARM_CONFIG`), environment variables (`SWARM_<SECTION>_<KEY>`, shown per key), then
`--set section.key=value`. With `swarm join --run` the signed run manifest's shared settings come last.
A section marked *optional* may be set to `null` (`--set checkpoint=null`), which turns its feature off.
An unknown key is an error that names it. `swarm config show` prints the tree a command would use.
"""


def render() -> str:
    """The whole reference as Markdown."""
    lines = [HEADER]
    top = [(name, info) for name, info in SwarmConfig.model_fields.items() if section_model(info.annotation) is None]
    if top:
        lines += ["## Top level", "", *_table("", top)]
    for name, info in SwarmConfig.model_fields.items():
        model = section_model(info.annotation)
        if model is not None:
            lines += _section(name, info, model)
    return "\n".join(lines).rstrip() + "\n"


def _section(path: str, info: FieldInfo, model: type[BaseModel]) -> list[str]:
    optional = " *(optional: `null` turns it off)*" if _is_optional(info) else ""
    lines = [f"## `{path}`{optional}", ""]
    doc = inspect.cleandoc(model.__doc__ or "")
    if doc:  # reST roles and literals as Markdown code
        lines += [re.sub(r":\w+:`([^`]+)`", r"`\1`", " ".join(doc.split())).replace("``", "`"), ""]
    if info.description:
        lines += [info.description[0].upper() + info.description[1:] + ".", ""]
    fields = [(name, sub) for name, sub in model.model_fields.items() if section_model(sub.annotation) is None]
    lines += _table(path, fields)
    for name, sub in model.model_fields.items():
        nested = section_model(sub.annotation)
        if nested is not None:
            lines += _section(f"{path}.{name}", sub, nested)
    return lines


def _table(path: str, fields: list[tuple[str, FieldInfo]]) -> list[str]:
    rows = ["| key | type | default | environment | description |", "|---|---|---|---|---|"]
    for name, info in fields:
        key = f"{path}.{name}" if path else name
        # the loader maps SWARM_<SECTION>_<KEY> one level deep; nested sections take --set only
        env = f"`SWARM_{key.upper().replace('.', '_')}`" if key.count(".") <= 1 else "(`--set` only)"
        rows.append(f"| `{key}` | {_type(info.annotation)} | {_default(info)} | {env} | "
                    f"{_cell(_describe(info))} |")
    return rows + [""]


def _describe(info: FieldInfo) -> str:
    bounds = []
    for item in info.metadata:
        for kind, symbol in ((Ge, ">="), (Gt, ">"), (Le, "<="), (Lt, "<")):
            if isinstance(item, kind):
                bounds.append(f"{symbol} {_number(getattr(item, kind.__name__.lower()))}")
        if isinstance(item, MaxLen):
            bounds.append(f"at most {item.max_length} characters")
    text = info.description or ""
    if bounds:
        text = f"{text} ({', '.join(bounds)})" if text else ", ".join(bounds)
    return text


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{_value(arg)}`" for arg in args)
    if origin is typing.Union:
        parts = [arg for arg in args if arg is not type(None)]
        inner = " \\| ".join(_type(arg) for arg in parts)
        return f"{inner} \\| `null`" if len(parts) < len(args) else inner
    if origin in (list, tuple):
        return f"list of {_type(args[0])}" if args else "list"
    if annotation is Path:
        return "path"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    return f"`{_value(value)}`"


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return str(value)


def _number(value: float) -> str:
    return f"{value:_}".replace("_", ",") if isinstance(value, int) and not isinstance(value, bool) else f"{value:g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _is_optional(info: FieldInfo) -> bool:
    return type(None) in typing.get_args(info.annotation)
