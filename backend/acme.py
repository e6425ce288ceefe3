"""An ACME (RFC 8555) client for the edge, on certbot's ``acme`` and ``josepy`` libraries.

:class:`AcmeClient` keeps one ACME account per directory URL (its key in the edge's data
dir, mode 0600) and obtains certificates with :meth:`AcmeClient.obtain`, which blocks
(the library speaks ``requests``): the edge runs it in a worker thread.  Challenges are
answered by the edge's own public listeners through a shared :class:`ChallengeAnswers`:

- ``http-01``: the HTTP listener answers ``/.well-known/acme-challenge/<token>`` before
  routing (:meth:`ChallengeAnswers.http01`);
- ``tls-alpn-01`` (RFC 8737): the HTTPS listener, seeing a ClientHello that offers only
  the ``acme-tls/1`` protocol for a name being validated, completes the handshake with
  the challenge certificate (:meth:`ChallengeAnswers.tls_alpn_context`) and closes.

The ``acme`` library dropped its ``tls-alpn-01`` classes; the two small ones below
register the type again (the key authorization and the JWS signing stay the library's).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from backend import __version__
from backend.fsperm import private_dir
from backend.tls import load_chain

__all__ = ["ACME_TLS_ALPN", "AcmeClient", "AcmeError", "ChallengeAnswers", "Issued"]

log = logging.getLogger("burrow.acme")

#: The ALPN protocol of a TLS-ALPN-01 validation connection (RFC 8737).
ACME_TLS_ALPN = "acme-tls/1"
#: id-pe-acmeIdentifier: the challenge certificate's extension holding SHA-256(key authz).
_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
#: How long one order may take, validation and finalization included.
ORDER_DEADLINE = dt.timedelta(seconds=90)
NETWORK_TIMEOUT = 30


class AcmeError(Exception):
    """An order could not be completed; the message says why (the CA's words if any)."""


if "tls-alpn-01" not in challenges.Challenge.TYPES:

    @challenges.ChallengeResponse.register
    class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
        """The (empty) answer to a tls-alpn-01 challenge: the proof is on the listener."""

        typ = "tls-alpn-01"

    @challenges.Challenge.register
    class TLSALPN01(challenges.KeyAuthorizationChallenge):
        """RFC 8737's challenge: a certificate with the key authorization's digest."""

        typ = "tls-alpn-01"
        response_cls = TLSALPN01Response

        def validation(self, account_key: jose.JWK, **unused: Any) -> str:
            return self.key_authorization(account_key)


@dataclass(frozen=True)
class Issued:
    """A certificate from the CA: the full chain and key (PEM) and its validity."""

    chain_pem: bytes
    key_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    #: the challenge types answered for this order (empty when the CA reused authorizations)
    challenges: tuple[str, ...] = ()

    @property
    def renew_at(self) -> dt.datetime:
        """Two thirds into the certificate's lifetime, as Caddy and certbot do."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


def server_context(chain_pem: bytes, key_pem: bytes, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting ``chain_pem`` (loaded via a 0600 temp file)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    load_chain(ctx, chain_pem, key_pem)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def new_key_pem(key_type: str = "ecdsa") -> bytes:
    """A fresh certificate key: ECDSA P-256 (default) or RSA 2048, as PKCS#8 PEM."""
    if key_type == "ecdsa":
        key: Any = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unsupported key type {key_type!r}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def validity(chain_pem: bytes) -> tuple[dt.datetime, dt.datetime]:
    leaf = x509.load_pem_x509_certificate(chain_pem)
    return leaf.not_valid_before_utc, leaf.not_valid_after_utc


class ChallengeAnswers:
    """Challenge answers in flight, written by ACME worker threads, read by listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._http: dict[str, bytes] = {}
        self._alpn: dict[str, ssl.SSLContext] = {}

    def http01(self, token: str) -> bytes | None:
        """The key authorization to answer for ``token``, if one is being validated."""
        with self._lock:
            return self._http.get(token)

    def tls_alpn_context(self, name: str) -> ssl.SSLContext | None:
        """The ``acme-tls/1`` context for ``name``, if it is being validated."""
        with self._lock:
            return self._alpn.get(name)

    def add_http01(self, token: str, key_authorization: str) -> None:
        with self._lock:
            self._http[token] = key_authorization.encode()

    def add_tls_alpn(self, name: str, key_authorization: str) -> None:
        ctx = _tls_alpn_context(name, key_authorization)
        with self._lock:
            self._alpn[name] = ctx

    def remove(self, token: str | None = None, name: str | None = None) -> None:
        with self._lock:
            if token is not None:
                self._http.pop(token, None)
            if name is not None:
                self._alpn.pop(name, None)


def _tls_alpn_context(name: str, key_authorization: str) -> ssl.SSLContext:
    """RFC 8737 §3: a self-signed certificate for ``name`` whose critical
    acmeIdentifier extension holds the SHA-256 of the key authorization (as a DER
    OCTET STRING), served only to ``acme-tls/1``."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(_ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return server_context(cert.public_bytes(serialization.Encoding.PEM), key_pem, [ACME_TLS_ALPN])


class AcmeClient:
    """One ACME account at one directory, obtaining certificates for names.

    ``challenge_types`` is the order of preference among the types the edge can answer
    (``tls-alpn-01`` needs the HTTPS listener, ``http-01`` the HTTP listener); the first
    one the CA offers for an authorization is used.
    """

    def __init__(
        self,
        directory_url: str,
        email: str | None,
        state_dir: Path,
        answers: ChallengeAnswers,
        *,
        ca_root: str | Path | None = None,
        challenge_types: tuple[str, ...] = ("tls-alpn-01", "http-01"),
    ) -> None:
        self.directory_url = directory_url
        self.email = email
        self.state_dir = Path(state_dir)
        self.answers = answers
        self.verify: str | bool = str(ca_root) if ca_root else True
        self.challenge_types = challenge_types
        self._lock = threading.Lock()
        self._key: jose.JWK | None = None
        self._account: messages.RegistrationResource | None = None
        self._directory: messages.Directory | None = None
        tag = hashlib.sha256(directory_url.encode()).hexdigest()[:12]
        self.account_file = self.state_dir / f"account-{tag}.json"

    # ---------------------------------------------------------------- the account
    def _net(self, account: messages.RegistrationResource | None = None) -> client.ClientNetwork:
        assert self._key is not None
        return client.ClientNetwork(
            self._key,
            account=account,
            alg=jose.ES256,
            verify_ssl=self.verify,  # type: ignore[arg-type]  # requests takes a CA file too
            user_agent=f"burrow/{__version__}",
            timeout=NETWORK_TIMEOUT,
        )

    def _load_key(self) -> None:
        private_dir(self.state_dir)
        if self.account_file.exists():
            data = json.loads(self.account_file.read_text())
            key = serialization.load_pem_private_key(data["key_pem"].encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise AcmeError(f"{self.account_file} does not hold an EC account key")
            self._key = jose.JWKEC(key=key)
            return
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        body = json.dumps({"directory": self.directory_url, "key_pem": pem}).encode()
        fd = os.open(self.account_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        self._key = jose.JWKEC(key=key)
        log.info("created an ACME account key in %s", self.account_file)

    def _client(self) -> client.ClientV2:
        """A client signed with the account (registered on first use), one per order:
        the library's network object keeps nonces and is not shared between threads."""
        with self._lock:
            if self._key is None:
                self._load_key()
            if self._directory is None:
                self._directory = client.ClientV2.get_directory(self.directory_url, self._net())
            if self._account is None:
                acme = client.ClientV2(self._directory, self._net())
                reg = messages.NewRegistration.from_data(
                    email=self.email or None, terms_of_service_agreed=True
                )
                try:
                    self._account = acme.new_account(reg)
                    log.info("registered ACME account %s", self._account.uri)
                except errors.ConflictError as exc:  # the key already has an account
                    self._account = messages.RegistrationResource(
                        uri=exc.location, body=messages.Registration()
                    )
            return client.ClientV2(self._directory, self._net(self._account))

    # ------------------------------------------------------------------ an order
    def obtain(self, names: list[str], key_type: str = "ecdsa") -> Issued:
        """Order, validate and download a certificate for ``names`` (blocking).

        Raises :class:`AcmeError` with the CA's reason when the order fails.
        """
        try:
            return self._obtain(names, key_type)
        except AcmeError:
            raise
        except errors.ValidationError as exc:
            raise AcmeError(_validation_reason(exc)) from None
        except messages.Error as exc:
            raise AcmeError(f"the ACME server refused: {exc.detail or exc.typ}") from None
        except errors.TimeoutError:
            raise AcmeError("the ACME order did not complete in time") from None
        except Exception as exc:  # network errors, a directory that is not one ...
            raise AcmeError(f"{type(exc).__name__}: {exc}") from None

    def _obtain(self, names: list[str], key_type: str) -> Issued:
        acme = self._client()
        assert self._key is not None
        key_pem = new_key_pem(key_type)
        csr = crypto_util.make_csr(key_pem, names)
        order = acme.new_order(csr)
        cleanup: list[dict] = []
        answered: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # an authorization the CA reused
                name = authz.body.identifier.value
                challb = self._pick(authz)
                kind = challb.chall.typ
                keyauth = challb.chall.key_authorization(self._key)
                if kind == "http-01":
                    token = challb.chall.encode("token")
                    self.answers.add_http01(token, keyauth)
                    cleanup.append({"token": token})
                else:
                    self.answers.add_tls_alpn(name, keyauth)
                    cleanup.append({"name": name})
                log.debug("answering %s for %s", kind, name)
                answered.append(kind)
                acme.answer_challenge(challb, challb.chall.response(self._key))
            deadline = dt.datetime.now() + ORDER_DEADLINE
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for item in cleanup:
                self.answers.remove(**item)
        chain = order.fullchain_pem.encode()
        not_before, not_after = validity(chain)
        return Issued(chain, key_pem, not_before, not_after, tuple(answered))

    def _pick(self, authz: messages.AuthorizationResource) -> messages.ChallengeBody:
        offered = {c.chall.typ: c for c in authz.body.challenges if hasattr(c.chall, "typ")}
        for kind in self.challenge_types:
            if kind in offered:
                return offered[kind]
        raise AcmeError(
            f"the CA offers {sorted(offered)} for {authz.body.identifier.value}; this edge "
            f"answers only {list(self.challenge_types)}"
        )


def _validation_reason(exc: errors.ValidationError) -> str:
    reasons = []
    for authz in exc.failed_authzrs:
        for c in authz.body.challenges:
            if c.error is not None:
                reasons.append(f"{authz.body.identifier.value}: {c.error.detail or c.error.typ}")
    return "validation failed: " + ("; ".join(reasons) or "the CA gave no reason")
