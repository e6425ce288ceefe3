"""The local certificate authority and the SSL contexts built from it.

On first run :class:`LocalCA` makes an ECDSA P-256 root in the data dir (``ca.pem`` and
``ca-key.pem``, the key readable by the owner only); the edge then issues short leaf
certificates from it for its HTTPS listener and its agent ingress port, and clients
trust ``ca.pem``. ECDSA P-256 keeps key generation and signing at about a millisecond,
so issuing a certificate for a new SNI name inside the handshake is cheap.

Contexts returned by :meth:`LocalCA.server_context` and :meth:`LocalCA.sni_context` are
cached and shared: configure a copy of your own rather than mutating them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from backend.fsperm import private_dir
from backend.tlsclient import client_context

__all__ = ["CA_COMMON_NAME", "LocalCA", "client_context", "normalize_hostnames"]

log = logging.getLogger(__name__)

CA_COMMON_NAME = "burrow local CA"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=365)
LEAF_BACKDATE = dt.timedelta(hours=1)
#: Per-hostname contexts kept by the SNI callback; the oldest unused are dropped.
SNI_CACHE_SIZE = 1024
#: Contexts kept by ``server_context`` per distinct hostname set.
SERVER_CACHE_SIZE = 256

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse_ip(name: str) -> _IPAddress | None:
    """Return the address if ``name`` is an IP literal (brackets allowed for IPv6)."""
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def normalize_hostnames(hostnames: Iterable[str]) -> tuple[str, ...]:
    """Lower-case, strip trailing dots and duplicates, keeping first-seen order."""
    seen: dict[str, None] = {}
    for raw in hostnames:
        name = raw.strip().rstrip(".").lower()
        if not name:
            continue
        ip = _parse_ip(name)
        seen.setdefault(str(ip) if ip is not None else name, None)
    if not seen:
        raise ValueError("at least one hostname is needed for a certificate")
    return tuple(seen)


def _write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (never briefly wider).

    With ``exclusive`` an existing ``path`` is never replaced (FileExistsError instead).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        if exclusive:
            os.link(tmp, path)  # atomic, and fails if path exists
            Path(tmp).unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Atomically write a non-secret file (the CA certificate) with mode 0644."""
    _write_private(path, data, exclusive=exclusive)
    os.chmod(path, 0o644)


def _new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a PEM chain and key into ``ctx`` through a 0600 temp file removed at once.

    The ssl module only reads certificates from files; mkstemp creates the file 0600.
    """
    fd, tmp = tempfile.mkstemp(prefix="burrow-leaf-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
            fh.write(chain_pem)
        ctx.load_cert_chain(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalCA:
    """A certificate authority kept in a data dir, issuing leaf certs for burrow's listeners."""

    def __init__(
        self,
        data_dir: Path,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
    ) -> None:
        """Wrap an already loaded CA; use :meth:`load_or_create` to get one."""
        self.data_dir = Path(data_dir)
        self.cert = cert
        self.key = key
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._lock = threading.Lock()
        self._server_cache: OrderedDict[tuple[str, ...], ssl.SSLContext] = OrderedDict()
        self._sni_cache: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._sni_roots: dict[tuple[str, ...], ssl.SSLContext] = {}

    # -- creation and loading ---------------------------------------------------------

    @classmethod
    def load_or_create(cls, data_dir: Path) -> LocalCA:
        """Load ``ca.pem``/``ca-key.pem`` from ``data_dir``, creating them on first run."""
        data_dir = Path(data_dir)
        cert_path, key_path = data_dir / CA_CERT_FILE, data_dir / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            return cls._load(data_dir, cert_path, key_path)
        if cert_path.exists():
            raise FileNotFoundError(
                f"{cert_path} exists but its key {key_path} is missing; restore the key or "
                f"remove {cert_path} to make a new CA (clients must then trust the new one)"
            )
        if key_path.exists():  # never replace a CA key: agents trust the certificate it signed
            raise FileNotFoundError(
                f"{key_path} exists but its certificate {cert_path} is missing; restore the "
                f"certificate or remove {key_path} to make a new CA (clients must then trust the new one)"
            )
        private_dir(data_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = cls._make_ca_cert(key)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first: the certificate file is the marker that the CA is complete. Neither
        # write replaces a file that appeared meanwhile (another edge on the same dir).
        _write_private(key_path, key_pem, exclusive=True)
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), exclusive=True)
        log.info("created local CA in %s", data_dir)
        return cls(data_dir, cert, key)

    @classmethod
    def _load(cls, data_dir: Path, cert_path: Path, key_path: Path) -> LocalCA:
        mode = key_path.stat().st_mode
        if mode & 0o077:  # tighten a key someone made group/world readable
            log.warning("%s was readable by others; setting mode 0600", key_path)
            os.chmod(key_path, 0o600)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} does not hold an EC private key")
        if cert.public_key() != key.public_key():
            raise ValueError(f"{key_path} does not match {cert_path}")
        return cls(data_dir, cert, key)

    @staticmethod
    def _make_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "burrow"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )

    @property
    def ca_file(self) -> Path:
        """Path of the CA certificate (``ca.pem``) that clients should trust."""
        return self.data_dir / CA_CERT_FILE

    # -- issuing ----------------------------------------------------------------------

    def issue(self, hostnames: list[str], key_type: str = "ecdsa", client: bool = False) -> tuple[bytes, bytes]:
        """Issue a leaf cert for ``hostnames``; return ``(leaf + CA chain PEM, key PEM)``.

        IP literals become IPAddress SANs, everything else DNS SANs; the first name is
        also the subject CN. Valid one year, backdated an hour for clock skew, and never
        past the CA's own expiry. ``key_type`` is ``"ecdsa"`` (P-256, the default) or
        ``"rsa"`` (2048 bits, noticeably slower to generate).  ``client``: also good
        for TLS client authentication (a cluster's peer links, backend/cluster/peer.py).
        """
        names = normalize_hostnames(hostnames)
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
        if key_type == "ecdsa":
            key = ec.generate_private_key(ec.SECP256R1())
        elif key_type == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"unsupported key type {key_type!r}")
        sans: list[x509.GeneralName] = []
        for name in names:
            ip = _parse_ip(name)
            sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(name))
        now = _now()
        not_after = min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        cn = names[0][:64]  # CN is limited to 64 characters; SANs carry the full names
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, *([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return chain, key_pem

    # -- server contexts --------------------------------------------------------------

    def server_context(self, hostnames: list[str]) -> ssl.SSLContext:
        """Return a TLS 1.2+ server context with a cert for ``hostnames`` (cached per set)."""
        names = normalize_hostnames(hostnames)
        cache_key = tuple(sorted(names))
        with self._lock:
            ctx = self._server_cache.get(cache_key)
            if ctx is not None:
                self._server_cache.move_to_end(cache_key)
                return ctx
        ctx = self._build_context(names)
        with self._lock:
            ctx = self._server_cache.setdefault(cache_key, ctx)
            self._server_cache.move_to_end(cache_key)
            while len(self._server_cache) > SERVER_CACHE_SIZE:
                self._server_cache.popitem(last=False)
        return ctx

    def _build_context(self, names: Iterable[str]) -> ssl.SSLContext:
        chain, key = self.issue(list(names))
        ctx = _new_server_context()
        load_chain(ctx, chain, key)
        return ctx

    def _context_for_name(self, name: str) -> ssl.SSLContext:
        """Return the cached per-hostname context for SNI, issuing a cert on first use."""
        with self._lock:
            ctx = self._sni_cache.get(name)
            if ctx is not None:
                self._sni_cache.move_to_end(name)
                return ctx
        ctx = self._build_context([name])
        with self._lock:
            ctx = self._sni_cache.setdefault(name, ctx)
            self._sni_cache.move_to_end(name)
            while len(self._sni_cache) > SNI_CACHE_SIZE:
                self._sni_cache.popitem(last=False)
        return ctx

    def sni_context(
        self,
        default_hostnames: list[str],
        pick: Callable[[str], ssl.SSLContext | None] | None = None,
    ) -> ssl.SSLContext:
        """Return a server context that presents a cert for whatever name the client sends.

        With ``pick``, a name for which it returns a context (a certificate from an
        ACME CA, say) gets that one instead; such a context is built anew, not cached.

        Clients without SNI (or with a name that cannot go in a certificate) get the
        cert for ``default_hostnames``. Per-name contexts are issued on first use and kept
        in an LRU cache of :data:`SNI_CACHE_SIZE` entries shared by all SNI contexts; the
        SNI context itself is cached per default hostname set.
        """
        names = normalize_hostnames(default_hostnames)
        cache_key = tuple(sorted(names))
        with self._lock:
            cached = self._sni_roots.get(cache_key)
        if cached is not None and pick is None:
            return cached
        ctx = self._build_context(names)
        default_set = set(names)

        def pick_certificate(
            sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _ctx: ssl.SSLContext
        ) -> int | None:
            if not server_name:
                return None
            name = server_name.rstrip(".").lower()
            if pick is not None:
                chosen = pick(name)
                if chosen is not None:
                    sslobj.context = chosen
                    return None
            if name in default_set or not _valid_sni_name(name):
                return None
            try:
                sslobj.context = self._context_for_name(name)
            except Exception:  # never let a bad name kill the loop; fall back to default
                log.exception("could not issue a certificate for SNI name %r", name)
            return None

        ctx.sni_callback = pick_certificate
        if pick is not None:
            return ctx
        with self._lock:
            return self._sni_roots.setdefault(cache_key, ctx)


def _valid_sni_name(name: str) -> bool:
    """True if ``name`` is a syntactically valid DNS name we may put in a certificate."""
    if len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    for label in labels:
        if not 1 <= len(label) <= 63 or label[0] == "-" or label[-1] == "-":
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True
