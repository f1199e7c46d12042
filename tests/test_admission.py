"""Admission certificates, their DHT record and the private run's DHT authorizer, without a swarm."""

from __future__ import annotations

import time

import pytest
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.config.loading import load_config
from swarm.errors import ConfigError, ManifestError
from swarm.net.authorizer import RunAuthorizer
from swarm.net.certificate import issue_certificate, read_certificate, verify_certificate
from swarm.net.certificate_record import CERTIFICATE_TTL, CertificateValidator
from swarm.net.identity import load_identity
from swarm.net.keys import certificates_key
from swarm.net.manifest import new_manifest

AUTHORITY = RSAPrivateKey()
PEER = load_identity(None)


def certificate(key=AUTHORITY, peer_id=PEER.peer_id, role="volunteer", valid_for=3600.0, **fields):
    return issue_certificate(key, run_id="swarm-debug", admission="private", peer_id=peer_id, role=role,
                             organization=None, valid_for=valid_for, **fields)


RUN = certificate().certificate.fingerprint


def test_a_certificate_checks_out_with_nothing_but_the_run_fingerprint():
    signed = certificate(role="institution")
    assert verify_certificate(signed.data, signed.signature, RUN).role == "institution"
    with pytest.raises(ManifestError, match="not of"):
        verify_certificate(signed.data, signed.signature, "a" * 32)
    forged = certificate(key=RSAPrivateKey())  # another authority: another fingerprint
    with pytest.raises(ManifestError, match="certificate of run"):
        verify_certificate(forged.data, forged.signature, RUN)
    tampered = signed.data.replace(b'"institution"', b'"volunteer"')
    with pytest.raises(ManifestError, match="not signed by the authority"):
        verify_certificate(tampered, signed.signature, RUN)
    old = certificate(now=time.time() - 7200)
    with pytest.raises(ManifestError, match="expired"):
        verify_certificate(old.data, old.signature, RUN)
    with pytest.raises(ManifestError, match="at most"):
        certificate(valid_for=10 * 365 * 86400)
    with pytest.raises(ManifestError, match="peer_id"):
        certificate(peer_id="not a peer id")


def test_certificate_file_round_trip(tmp_path):
    import json

    path = tmp_path / "cert.json"
    path.write_text(json.dumps(certificate().as_dict()))
    signed, run = read_certificate(path)
    assert run == RUN and signed.certificate.peer_id == PEER.peer_id
    path.write_text("{}")
    with pytest.raises(ManifestError, match="cannot read a certificate"):
        read_certificate(path)


def record(value, subkey=PEER.peer_id, expiration=None, key=certificates_key(RUN)):
    return DHTRecord(key=DHTID.generate(source=key).to_bytes(), subkey=MSGPackSerializer.dumps(subkey),
                     value=MSGPackSerializer.dumps(value),
                     expiration_time=expiration or get_dht_time() + CERTIFICATE_TTL / 2)


def test_dht_nodes_refuse_all_but_valid_certificates_under_their_own_peer_id():
    validator = CertificateValidator(RUN)
    signed = certificate()
    assert validator.check(record([signed.data, signed.signature])) == (None, "")
    other = load_identity(None).peer_id
    forged = certificate(key=RSAPrivateKey())
    cases = {
        "identity": record([signed.data, signed.signature], subkey=other),
        "forged": record([forged.data, forged.signature]),
        "expiration": record([signed.data, signed.signature], expiration=get_dht_time() + 365 * 86400),
        "oversized": record([signed.data + b" " * 4000, signed.signature]),
        "undecodable": DHTRecord(key=DHTID.generate(source=certificates_key(RUN)).to_bytes(), subkey=b"\xc1",
                                 value=b"\xc1", expiration_time=get_dht_time() + 60),
    }
    for reason, bad in cases.items():
        assert validator.check(bad)[0] == reason, reason
        assert validator.validate(bad) is False
    assert validator.validate(record(b"anything", key="another key"))  # other keys are not its business


def token(authorizer: RunAuthorizer) -> AccessToken:
    return authorizer._token


def test_the_dht_authorizer_admits_certified_keys_only():
    mine = RunAuthorizer(PEER.private_key, certificate(), RUN)
    other = load_identity(None)
    theirs = RunAuthorizer(other.private_key, certificate(peer_id=other.peer_id), RUN)
    assert mine.check(token(theirs)) == (None, "")
    assert mine.check(AccessToken())[0] == "not-admitted"
    stolen = AccessToken(); stolen.CopyFrom(token(theirs))  # noqa: E702
    stolen.public_key = PEER.private_key.get_public_key().to_bytes()  # someone else's certificate, own key
    assert mine.check(stolen) == ("not-admitted", f"signed by another key than {other.peer_id}'s")
    foreign = RunAuthorizer(other.private_key, certificate(key=RSAPrivateKey(), peer_id=other.peer_id), RUN)
    assert mine.check(token(foreign))[0] == "not-admitted"
    mine.revoked = frozenset({other.peer_id})
    assert mine.check(token(theirs))[0] == "revoked"
    assert mine.is_token_valid(token(theirs)) is False


def test_private_runs_train_in_diloco_mode():
    authority = AUTHORITY.get_public_key().to_bytes().decode()
    sync = load_config(None, [], environ={})
    with pytest.raises(ManifestError, match="a private run trains in DiLoCo mode"):
        new_manifest(sync, authority=authority, admission="private")
    diloco = load_config(None, ["averaging.mode=diloco"], environ={})
    assert new_manifest(diloco, authority=authority, admission="private").admission == "private"


def test_the_role_is_not_a_setting_any_more():
    with pytest.raises(ConfigError, match="peer.role is no longer a setting"):
        load_config(None, ["peer.role=institution"], environ={})
