"""docs/configuration.md is the schema's own rendering: a key added, removed or re-described in
swarm/config/schema.py without `make docs` fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarm.config.loading import _env_overrides
from swarm.config.reference import render
from swarm.config.schema import SwarmConfig, section_model

pytestmark = pytest.mark.timeout(30)

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_the_reference_is_current():
    assert REFERENCE.read_text() == render(), "docs/configuration.md is stale: run `make docs` and commit it"


def _keys(model, prefix=""):
    for name, info in model.model_fields.items():
        nested = section_model(info.annotation)
        yield from _keys(nested, f"{prefix}{name}.") if nested is not None else [f"{prefix}{name}"]


def test_every_key_is_listed_with_the_variable_the_loader_maps_to_it():
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \|.*?\| (`SWARM_[A-Z_]+`|\(`--set` only\)) \|", render(), re.M))
    assert set(rows) == set(_keys(SwarmConfig))
    for key, env in rows.items():
        if env.startswith("`SWARM_"):
            assert [dotted for dotted, _ in _env_overrides({env.strip("`"): "1"})] == [key]
