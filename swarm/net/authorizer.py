"""A private run's DHT admits only certified peers: hivemind's token authorizer, with certificates as tokens.

hivemind's :class:`~hivemind.utils.auth.TokenAuthorizerBase` signs every DHT request and response
with the sender's key and attaches the sender's access token; the receiver checks the token, the
signature, a time window and a nonce (no replays). Here the token is the peer's admission certificate
(:mod:`swarm.net.certificate`) and its key is the peer's identity key, so a request checks out only if
it comes from the holder of the key of a certified peer id: an outsider that knows every multiaddr
gets no record stored, no record read and no place in anyone's routing table, and an admitted peer
never takes an outsider's answer either.

The authorizer lives in the DHT process. The peer's main process hands it the run's revocations
(from the newest manifest) with :func:`install_revocations`; a revoked peer's requests are refused
from then on. Refusals are counted with the node's record refusals (:data:`swarm.net.refusals.REFUSALS`,
reason ``not-admitted``, ``revoked`` or ``expired``).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Iterable, Optional

from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import get_logger
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import ManifestError
from swarm.net.certificate import MAX_CERTIFICATE_BYTES, Certificate, SignedCertificate, verify_certificate
from swarm.net.identity import peer_id_of_public_key
from swarm.net.refusals import refuse

logger = get_logger(__name__)

MAX_REMEMBERED = 4096  # verified tokens kept, so a known peer's token costs no RSA check per request


class RunAuthorizer(TokenAuthorizerBase):
    """Signs this peer's DHT requests and responses with its certificate; admits only certified peers.

    :param private_key: the peer's identity key (its certificate names the peer id of this key).
    :param certificate: this peer's certificate for run ``run``.
    :param run: the run's fingerprint.
    """

    def __init__(self, private_key: RSAPrivateKey, certificate: SignedCertificate, run: str):
        super().__init__(private_key)
        self.run = run
        self.revoked: frozenset[str] = frozenset()
        self._token = AccessToken(username=certificate.data.decode(), public_key=self.local_public_key.to_bytes(),
                                  expiration_time=str(certificate.certificate.expires),
                                  signature=certificate.signature)
        self._verified: OrderedDict[bytes, Certificate] = OrderedDict()

    async def get_token(self) -> AccessToken:
        return self._token

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # a certificate is renewed by the authority issuing a new one, which needs a restart

    def is_token_valid(self, access_token: AccessToken) -> bool:
        reason, detail = self.check(access_token)
        if reason is None:
            return True
        identity = access_token.username.encode()[:MAX_CERTIFICATE_BYTES] + access_token.public_key[:1024]
        refuse(logger, reason, identity, f"run {self.run}", detail, "a DHT request or response")
        return False

    def check(self, token: AccessToken) -> tuple[Optional[str], str]:
        """(None, "") for the token of an admitted peer, else (reason, detail)."""
        key = token.SerializeToString()
        certificate = self._verified.get(key)
        if certificate is None:
            if not token.username:
                return "not-admitted", "no certificate"
            try:
                certificate = verify_certificate(token.username.encode(), token.signature, self.run)
            except ManifestError as e:
                return "not-admitted", str(e)
            if peer_id_of_public_key(token.public_key) != certificate.peer_id:
                return "not-admitted", f"signed by another key than {certificate.peer_id}'s"
            self._verified[key] = certificate
            while len(self._verified) > MAX_REMEMBERED:
                self._verified.popitem(last=False)
        if certificate.peer_id in self.revoked:
            return "revoked", f"{certificate.peer_id} is revoked"
        if certificate.expired():
            return "expired", f"the certificate of {certificate.peer_id} expired"
        return None, ""


async def _install(revoked: frozenset[str], _dht, node) -> bool:
    authorizer = node.protocol.authorizer
    if not isinstance(authorizer, RunAuthorizer):
        return False
    authorizer.revoked = revoked
    return True


def install_revocations(dht, revoked: Iterable[str], timeout: float = 10.0) -> bool:
    """Give the DHT process's authorizer the run's revoked peer ids. False: the DHT has none (an open run)."""
    return dht.run_coroutine(partial(_install, frozenset(revoked)), return_future=True).result(timeout)
