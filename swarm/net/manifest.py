"""The run manifest: what a run's owner fixes for every peer, and how a peer's own config is checked
against it. Signing, the DHT record and fetching are in :mod:`swarm.net.manifest_record`.

A run has an owner: whoever holds the **run authority key** (an RSA key in libp2p's format, made by
``swarm run create``). The manifest names the run, the settings that must be the same on every peer
(:data:`MUST_MATCH`: model, optimizer, the swarm-wide batch, seed and epochs, averaging), the codecs
peers may send, the admission policy, its creation time and a version, and carries the authority's
public key. Everything else in a peer's config (data, device, local batch size, name, ports,
identity, checkpoints, metrics) stays local.

The **fingerprint** identifies the run: 32 base32 characters of sha256 over the authority's public
key and the run id. Knowing it is enough to find the manifest in the DHT (its key is derived from
it) and to check it (only the authority's key gives that fingerprint). A newer version, signed by the
same key, replaces an older one.

Serialization is canonical (JSON, sorted keys, no spaces, ASCII, no NaN), so a signature covers
exactly one byte string. This module imports neither hivemind nor torch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from typing import Any, Literal, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from swarm.compression.registry import CODEC_NAMES
from swarm.config.loading import describe_validation_error
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError, ManifestError

FORMAT = 1
MAX_REVOKED = 1000
# a debug-preset manifest is about 1.6 kB with its signature (measured); each revocation adds about 50 bytes
MAX_MANIFEST_BYTES = 8192 + 56 * MAX_REVOKED
DEFAULT_REFRESH = 30.0
FINGERPRINT_RE = re.compile(r"^[a-z2-7]{32}$")
PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,64}$")  # base58, as libp2p prints peer ids
# section -> the fields every peer must share (None: the whole section); run_id is top-level
MUST_MATCH: dict[str, Optional[tuple[str, ...]]] = {
    "run_id": None,
    "model": None,
    "optimizer": ("lr", "weight_decay", "betas", "warmup_epochs", "grad_clip"),
    "training": ("target_batch_size", "max_epochs", "seed"),
    "averaging": None,
    "sync": None,
    "diloco": None,
}


class RunManifest(BaseModel):
    """One version of a run's manifest (unsigned). ``settings`` holds exactly the :data:`MUST_MATCH` keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = FORMAT
    run_id: str = Field(pattern=SwarmConfig.model_fields["run_id"].metadata[0].pattern)
    version: int = Field(ge=1, le=2**31, description="a newer version, signed by the same key, replaces an older")
    created: float = Field(ge=0, le=1e11, description="unix time of signing")
    authority: str = Field(pattern=r"^ssh-rsa [A-Za-z0-9+/=]{100,1200}$", description="the authority's public key")
    admission: Literal["open", "private"] = Field(
        "open", description="open: anyone may train; private: only peers with a certificate (swarm admit)")
    revoked: list[str] = Field([], max_length=MAX_REVOKED, description="peer ids whose certificates are revoked")
    refresh: float = Field(DEFAULT_REFRESH, ge=1.0, le=600.0,
                           description="seconds between a peer's reads of the newest manifest: a revocation "
                                       "takes effect within this long after a bootstrap peer publishes it")
    codecs: list[Literal[CODEC_NAMES]] = Field(min_length=1, max_length=len(CODEC_NAMES))
    settings: dict[str, Any]

    @model_validator(mode="after")
    def _settings_are_the_must_match_ones(self):
        if set(self.settings) != set(MUST_MATCH):
            raise ValueError(f"settings must hold exactly {sorted(MUST_MATCH)}")
        if self.settings["run_id"] != self.run_id:
            raise ValueError("settings.run_id differs from run_id")
        for section, fields in MUST_MATCH.items():
            value = self.settings[section]
            if fields is not None and (not isinstance(value, dict) or set(value) != set(fields)):
                raise ValueError(f"settings.{section} must hold exactly {list(fields)}")
        try:
            config = apply_settings(SwarmConfig(), self.settings)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.admission == "private" and config.averaging.mode != "diloco":
            raise ValueError("a private run trains in DiLoCo mode (averaging.mode=diloco): sync mode's averagers "
                             "are hivemind's, whose handlers cannot check who calls them")
        if any(not PEER_ID_RE.match(peer) for peer in self.revoked) or len(set(self.revoked)) != len(self.revoked):
            raise ValueError("revoked must list distinct peer ids")
        if config.averaging.compression not in self.codecs:
            raise ValueError(f"codecs must include averaging.compression ({config.averaging.compression})")
        return self

    def canonical(self) -> bytes:
        """The bytes the authority signs."""
        return canonical_json(self.model_dump(mode="json"))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.authority, self.run_id)


def new_manifest(config: SwarmConfig, *, authority: str, version: int = 1, created: Optional[float] = None,
                 admission: str = "open", revoked: Sequence[str] = (), refresh: float = DEFAULT_REFRESH) -> RunManifest:
    """Version ``version`` of the manifest of ``config``'s run, owned by ``authority`` (``ssh-rsa ...``).

    :raises ManifestError: the result is not a valid manifest (e.g. a private run in sync mode).
    """
    try:
        return RunManifest(run_id=config.run_id, version=version, created=time.time() if created is None else created,
                           authority=authority, admission=admission, revoked=list(revoked), refresh=refresh,
                           codecs=[config.averaging.compression], settings=settings_of(config))
    except ValidationError as e:
        raise ManifestError(f"cannot make this manifest: {describe_validation_error(e)}") from None


def canonical_json(tree: Any) -> bytes:
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def fingerprint(authority: str, run_id: str) -> str:
    """32 lowercase base32 characters (160 bits) of sha256 over the authority's public key and the run id."""
    digest = hashlib.sha256(b"swarm-run\0" + authority.encode() + b"\0" + run_id.encode()).digest()
    return base64.b32encode(digest[:20]).decode().lower()


def check_fingerprint(text: str) -> str:
    """``text`` if it is shaped like a fingerprint. :raises ConfigError: it is not."""
    if not FINGERPRINT_RE.match(text):
        raise ConfigError(f"--run {text!r} is not a run fingerprint (32 characters a-z, 2-7, as printed by "
                          f"`swarm run create` and `swarm bootstrap`)")
    return text


def parse_manifest(data: bytes) -> RunManifest:
    """The manifest in ``data``, which must be in canonical form. :raises ManifestError: it is not one."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(data)} bytes, at most {MAX_MANIFEST_BYTES} allowed")
    try:
        manifest = RunManifest.model_validate_json(data)
    except (ValidationError, ConfigError) as e:
        detail = describe_validation_error(e) if isinstance(e, ValidationError) else str(e)
        raise ManifestError(f"not a valid run manifest: {detail}") from None
    if manifest.canonical() != data:
        raise ManifestError("manifest is not in canonical form")
    return manifest


def settings_of(config: SwarmConfig) -> dict[str, Any]:
    """The :data:`MUST_MATCH` part of ``config``, as JSON values."""
    tree = config.model_dump(mode="json")
    settings = {}
    for section, fields in MUST_MATCH.items():
        value = tree[section]
        settings[section] = value if fields is None or value is None else {key: value[key] for key in fields}
    return settings


def apply_settings(config: SwarmConfig, settings: Mapping[str, Any]) -> SwarmConfig:
    """``config`` with the manifest's ``settings`` in place of its own. :raises ConfigError: invalid result."""
    tree = config.model_dump(mode="json")
    for section, fields in MUST_MATCH.items():
        value = settings[section]
        if fields is None or value is None or tree[section] is None:
            tree[section] = value
        else:
            tree[section].update(value)
    try:
        return SwarmConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from None


def contradictions(config: SwarmConfig, explicit: set[str], manifest: RunManifest) -> list[str]:
    """``key=value (manifest: value)`` for every key this peer set itself (``explicit``: dotted keys of
    its YAML, ``SWARM_*`` variables and ``--set``) whose value differs from the manifest's."""
    ours, theirs = config.model_dump(mode="json"), manifest.settings
    found = []
    for key in sorted(explicit):
        own, wanted = _lookup(ours, key), _lookup(theirs, key)
        if wanted is _MISSING or own == wanted:
            continue
        shown = "no such section" if wanted is _OFF else json.dumps(wanted)
        found.append(f"{key}={json.dumps(own)} (manifest: {shown})")
    return found


def apply_manifest(config: SwarmConfig, explicit: set[str], manifest: RunManifest) -> SwarmConfig:
    """``config`` with the manifest's settings. :raises ManifestError: this peer's config contradicts it."""
    conflicts = contradictions(config, explicit, manifest)
    if conflicts:
        raise ManifestError(f"this peer's config contradicts the manifest of run {manifest.run_id} "
                            f"({manifest.fingerprint}): {'; '.join(conflicts)}; remove these settings to join it")
    return apply_settings(config, manifest.settings)


_MISSING, _OFF = object(), object()


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at ``dotted`` in ``tree``; _MISSING if the manifest does not fix it, _OFF if the path
    runs into a section the manifest turns off (null)."""
    node = tree
    for part in dotted.split("."):
        if node is None:
            return _OFF
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def explicit_keys(tree: Mapping[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of a raw config tree (as :func:`swarm.config.loading.config_tree` reads it)."""
    keys = set()
    for name, value in tree.items():
        dotted = f"{prefix}{name}"
        keys |= explicit_keys(value, dotted + ".") if isinstance(value, dict) and value else {dotted}
    return keys
