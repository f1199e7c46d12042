"""What a run's owner does: `swarm run create` (the authority key and the signed run manifest),
`swarm admit` (a certificate for one peer id) and `swarm revoke` (a new manifest version that revokes
one); and what a peer does first to be admitted: `swarm id` (print its peer id).

The key file (libp2p's RSA format, like a peer identity) is made if missing and never leaves the
operator's machine. Running `run create` again with the same key and ``--out`` signs the next
version of the same run (same fingerprint), e.g. to change its settings; bootstrap peers publish
the newest version in the file they serve, and every peer reads it within ``manifest.refresh`` s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from peers.lifecycle import write_json_atomic
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError, ManifestError
from swarm.net.certificate import issue_certificate
from swarm.net.identity import Identity, load_identity
from swarm.net.manifest import DEFAULT_REFRESH, RunManifest, contradictions, explicit_keys, new_manifest
from swarm.net.manifest_record import SignedManifest, authority_of, read_manifest_file, sign_manifest

logger = logging.getLogger(__name__)


def create_run(config: SwarmConfig, *, key_path: Path, out: Path, private: bool = False,
               refresh: Optional[float] = None) -> None:
    key = _authority_key(key_path)
    authority = authority_of(key.private_key)
    admission = "private" if private else "open"
    version, revoked = 1, ()
    if Path(out).exists():
        previous = read_manifest_file(out)
        draft = new_manifest(config, authority=authority, admission=admission)
        if previous.fingerprint != draft.fingerprint:
            raise ConfigError(f"{out} holds the manifest of another run ({previous.manifest.run_id}, "
                              f"{previous.fingerprint}) or another authority key; choose another --out")
        if previous.manifest.admission != admission:
            raise ConfigError(f"run {config.run_id} is {previous.manifest.admission}; a run's admission policy "
                              f"cannot change (certificates name it): create a run with another run_id")
        version, revoked = previous.manifest.version + 1, previous.manifest.revoked
        refresh = previous.manifest.refresh if refresh is None else refresh
        changed = contradictions(config, explicit_keys(draft.settings), previous.manifest)
        logger.info(f"version {version} of run {config.run_id}; changed: {'; '.join(changed) or 'nothing'}")
    manifest = new_manifest(config, authority=authority, version=version, admission=admission, revoked=revoked,
                            refresh=DEFAULT_REFRESH if refresh is None else refresh)
    signed = sign_manifest(manifest, key.private_key)
    write_json_atomic(Path(out), signed.as_dict())
    print(f"run {config.run_id} ({admission}): manifest version {version} written to {out}", flush=True)
    print(f"  fingerprint {signed.fingerprint}", flush=True)
    print(f"  authority key {key.path} ({'new' if key.fresh else 'kept'}; keep it private: only it can sign "
          f"a new version)", flush=True)
    if private:
        print(f"Admit each peer (bootstrap peers too) by its id, printed by `swarm id`:\n"
              f"  swarm admit PEER_ID --manifest {out} --role volunteer --out certificate.json", flush=True)
    print(f"Start a bootstrap peer of this run with:\n  swarm bootstrap --manifest {out}"
          + (" --certificate BOOTSTRAP_CERTIFICATE" if private else ""), flush=True)


def admit(*, peer_id: str, manifest_path: Path, key_path: Path, role: str, organization: Optional[str],
          days: float, out: Path) -> None:
    """Write a certificate for ``peer_id`` in the run of the manifest at ``manifest_path``."""
    signed = read_manifest_file(manifest_path)
    key = _authority_key(key_path, must_exist=True)
    _check_authority(key, signed, key_path)
    manifest = signed.manifest
    certificate = issue_certificate(key.private_key, run_id=manifest.run_id, admission=manifest.admission,
                                    peer_id=peer_id, role=role, organization=organization, valid_for=days * 86400)
    if peer_id in manifest.revoked:
        raise ManifestError(f"{peer_id} is revoked in run {manifest.run_id}; a revoked peer id stays out")
    write_json_atomic(Path(out), certificate.as_dict())
    expires = time.strftime("%Y-%m-%d", time.gmtime(certificate.certificate.expires))
    print(f"certificate for {peer_id} as {role} in run {manifest.run_id} ({signed.fingerprint}), valid until "
          f"{expires}, written to {out}", flush=True)
    print(f"The peer joins with: swarm join --initial-peers <a bootstrap address> --certificate {Path(out).name}",
          flush=True)


def revoke(*, peer_id: str, manifest_path: Path, key_path: Path) -> SignedManifest:
    """Sign the next version of the manifest at ``manifest_path``, with ``peer_id`` revoked, into the same file.

    The run's bootstrap peers publish it at their next refresh (they re-read the file they serve);
    every peer of the run then refuses ``peer_id`` within ``manifest.refresh`` seconds.
    """
    signed = read_manifest_file(manifest_path)
    key = _authority_key(key_path, must_exist=True)
    _check_authority(key, signed, key_path)
    manifest = signed.manifest
    if peer_id in manifest.revoked:
        print(f"{peer_id} is already revoked (manifest version {manifest.version})", flush=True)
        return signed
    fields = manifest.model_dump()
    fields.update(version=manifest.version + 1, created=time.time(), revoked=[*manifest.revoked, peer_id])
    try:
        newer = sign_manifest(RunManifest(**fields), key.private_key)
    except ValueError as e:
        raise ManifestError(f"cannot revoke {peer_id!r}: {e}") from None
    write_json_atomic(Path(manifest_path), newer.as_dict())
    print(f"{peer_id} revoked in manifest version {newer.manifest.version} of run {manifest.run_id}, written to "
          f"{manifest_path}; bootstrap peers serving this file publish it within {manifest.refresh:g}s, and every "
          f"peer refuses {peer_id} within {manifest.refresh:g}s after that", flush=True)
    return newer


def print_id(identity_path: Optional[Path]) -> None:
    """Print this peer's id (making its key file if missing): what the run's owner admits."""
    if identity_path is None:
        raise ConfigError("no identity key file: pass --identity FILE or set network.identity_path (a peer needs a "
                          "lasting id to be admitted)")
    identity = load_identity(Path(identity_path).expanduser())
    print(identity.peer_id, flush=True)
    logger.info(f"identity {identity.path} ({'new' if identity.fresh else 'kept'})")


def _authority_key(key_path: Path, *, must_exist: bool = False) -> Identity:
    path = Path(key_path).expanduser()
    if must_exist and not path.exists():
        raise ConfigError(f"no run authority key at {path} (`swarm run create --key` makes it)")
    key = load_identity(path)
    os.chmod(key.path, 0o600)
    return key


def _check_authority(key: Identity, signed: SignedManifest, key_path: Path) -> None:
    if authority_of(key.private_key) != signed.manifest.authority:
        raise ManifestError(f"{key_path} is not the authority key of run {signed.manifest.run_id} ({signed.fingerprint})")
