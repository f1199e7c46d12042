"""The run manifest without processes: canonical bytes, fingerprint, sign and verify, the validator a DHT
node runs, a peer's config against the manifest; and one in-process DHT that keeps the newest version.
The end-to-end tests through the CLI are in test_run_manifest.py."""

from __future__ import annotations

import dataclasses
import json

import hivemind
import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from conftest import DEBUG_CONFIG
from harness.processes import wait_for
from swarm.config.loading import config_tree, load_config
from swarm.errors import ConfigError, ManifestError
from swarm.net.keys import manifest_key
from swarm.net.manifest import (
    FINGERPRINT_RE,
    RunManifest,
    apply_manifest,
    check_fingerprint,
    explicit_keys,
    fingerprint,
    new_manifest,
    parse_manifest,
)
from swarm.net.manifest_record import (
    MANIFEST_TTL,
    ManifestPublisher,
    ManifestValidator,
    authority_of,
    newest_manifest,
    publish_manifest,
    read_manifest_file,
    sign_manifest,
    verify_manifest,
)
from swarm.net.refusals import REFUSALS


@pytest.fixture(scope="module")
def keys():
    return RSAPrivateKey(), RSAPrivateKey()


@pytest.fixture(scope="module")
def manifest(keys):
    return new_manifest(load_config(DEBUG_CONFIG, environ={}), authority=authority_of(keys[0]), created=1.7e9)


def record(signed_data: bytes, signature: bytes, *, fp: str, version=1, expiration=None) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=manifest_key(fp)).to_bytes(), MSGPackSerializer.dumps(version),
                     MSGPackSerializer.dumps([signed_data, signature]),
                     get_dht_time() + 60 if expiration is None else expiration)


def test_canonical_bytes_are_sorted_compact_and_stable(manifest):
    data = manifest.canonical()
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()
    assert parse_manifest(data) == manifest and parse_manifest(data).canonical() == data
    assert len(data) < 2000
    with pytest.raises(ManifestError, match="canonical"):
        parse_manifest(json.dumps(json.loads(data), indent=1).encode())  # same content, other bytes


def test_fingerprint_names_the_key_and_the_run(keys, manifest):
    assert FINGERPRINT_RE.match(manifest.fingerprint)
    assert manifest.fingerprint == fingerprint(authority_of(keys[0]), "swarm-debug")
    assert manifest.fingerprint != fingerprint(authority_of(keys[1]), "swarm-debug")
    assert manifest.fingerprint != fingerprint(authority_of(keys[0]), "swarm-debug2")
    assert check_fingerprint(manifest.fingerprint) == manifest.fingerprint
    with pytest.raises(ConfigError, match="not a run fingerprint"):
        check_fingerprint("QmNotAFingerprint")


def test_only_the_authority_signature_verifies(keys, manifest):
    authority, other = keys
    signed = sign_manifest(manifest, authority)
    data = manifest.canonical()
    assert verify_manifest(data, signed.signature, manifest.fingerprint).manifest == manifest
    with pytest.raises(ManifestError, match="another authority"):
        sign_manifest(manifest, other)
    altered = data.replace(b'"lr":0.003', b'"lr":0.3')
    assert altered != data
    with pytest.raises(ManifestError, match="not its authority's"):
        verify_manifest(altered, signed.signature, manifest.fingerprint)
    with pytest.raises(ManifestError, match="not its authority's"):
        verify_manifest(data, other.sign(data), manifest.fingerprint)
    # the attacker's own, correctly signed manifest is of another run
    own = manifest.model_copy(update={"authority": authority_of(other)})
    with pytest.raises(ManifestError, match="not of " + manifest.fingerprint):
        verify_manifest(own.canonical(), other.sign(own.canonical()), manifest.fingerprint)


def test_manifest_schema_is_bounded(manifest):
    tree = json.loads(manifest.canonical())
    for change, fragment in [({"admission": "private"}, "a private run trains in DiLoCo mode"),
                             ({"admission": "closed"}, "admission"), ({"version": 0}, "version"),
                             ({"revoked": ["not a peer id"]}, "revoked must list distinct peer ids"),
                             ({"refresh": 0.1}, "refresh"),
                             ({"codecs": ["zstd"]}, "codecs"),
                             ({"settings": {**tree["settings"], "data": {}}}, "settings"),
                             ({"codecs": ["fp16"]}, "must include averaging.compression")]:
        with pytest.raises(ManifestError, match=fragment):
            parse_manifest(json.dumps({**tree, **change}, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(ManifestError, match="at most"):
        parse_manifest(b"{" + b" " * 100_000 + b"}")


def test_dht_validator_accepts_only_the_authority_s_current_records(keys, manifest):
    authority, other = keys
    fp, data = manifest.fingerprint, manifest.canonical()
    signature = sign_manifest(manifest, authority).signature
    validator = ManifestValidator(fp)
    assert validator.check(record(data, signature, fp=fp)) == (None, "")
    assert validator.validate(record(b"anything", b"else", fp="a" * 32))  # another key: not its business
    refused = {
        "forged": record(data.replace(b'"n_layers":4', b'"n_layers":40'), signature, fp=fp),
        "version": record(data, signature, fp=fp, version=7),
        "expiration": record(data, signature, fp=fp, expiration=get_dht_time() + 365 * 86400),
        "undecodable": dataclasses.replace(record(data, signature, fp=fp), value=b"\xc1 not msgpack"),
        "oversized": record(b"x" * 100_000, signature, fp=fp),
    }
    before = REFUSALS.snapshot()["counts"]
    for reason, forged in refused.items():
        assert validator.check(forged)[0] == reason
        assert not validator.validate(forged), reason
    assert validator.check(record(data, other.sign(data), fp=fp))[0] == "forged"
    after = REFUSALS.snapshot()["counts"]
    assert {reason: after[reason] - before.get(reason, 0) for reason in refused} == dict.fromkeys(refused, 1)


def test_peer_config_against_manifest(manifest):
    own = load_config(None, ["data.max_bytes=1000", "training.batch_size=4", "peer.display_name=me"], environ={})
    explicit = explicit_keys(config_tree(None, ["data.max_bytes=1000", "training.batch_size=4"], environ={}))
    assert explicit == {"data.max_bytes", "training.batch_size"}
    config = apply_manifest(own, explicit, manifest)
    assert (config.run_id, config.model.d_model, config.training.target_batch_size) == ("swarm-debug", 128, 192)
    assert (config.data.max_bytes, config.training.batch_size, config.peer.display_name) == (1000, 4, "me")
    contradicting = load_config(None, ["model.d_model=96", "optimizer.name=adamw8bit"], environ={})
    with pytest.raises(ManifestError) as error:
        apply_manifest(contradicting, {"model.d_model", "optimizer.name"}, manifest)
    assert "model.d_model=96 (manifest: 128)" in str(error.value) and "optimizer.name" not in str(error.value)
    # the debug preset itself agrees with a manifest made from it
    debug = load_config(DEBUG_CONFIG, environ={})
    assert apply_manifest(debug, explicit_keys(config_tree(DEBUG_CONFIG, environ={})), manifest) == debug


def test_manifest_file_round_trip_and_tampering(tmp_path, keys, manifest):
    signed = sign_manifest(manifest, keys[0])
    path = tmp_path / "m.json"
    path.write_text(json.dumps(signed.as_dict(), indent=2))
    assert read_manifest_file(path) == signed
    tree = signed.as_dict()
    tree["manifest"]["settings"]["optimizer"]["lr"] = 0.1
    path.write_text(json.dumps(tree))
    with pytest.raises(ManifestError, match="not its authority's"):
        read_manifest_file(path)


@pytest.mark.timeout(120)
def test_dht_keeps_the_newest_genuine_version(keys, manifest, tmp_path):
    authority, other = keys
    fp = manifest.fingerprint
    v2 = RunManifest.model_validate({**manifest.model_dump(), "version": 2})
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[ManifestValidator(fp)])
    try:
        assert publish_manifest(dht, sign_manifest(manifest, authority))
        assert publish_manifest(dht, sign_manifest(v2, authority))
        forged = RunManifest.model_validate({**manifest.model_dump(), "version": 3})
        assert not dht.store(manifest_key(fp), subkey=3, value=[forged.canonical(), other.sign(forged.canonical())],
                             expiration_time=get_dht_time() + MANIFEST_TTL)
        newest = newest_manifest(dht, fp)
        assert newest is not None and newest.manifest.version == 2
        # a publisher watches its file: the authority's version 4 replaces version 2 at once
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps(sign_manifest(v2, authority).as_dict()))
        publisher = ManifestPublisher(path=path).start(dht)
        v4 = RunManifest.model_validate({**manifest.model_dump(), "version": 4})
        path.write_text(json.dumps(sign_manifest(v4, authority).as_dict()))
        wait_for(lambda: newest_manifest(dht, fp).manifest.version == 4, timeout=30, what="version 4")
        publisher.check()
        publisher.shutdown()
    finally:
        dht.shutdown()
