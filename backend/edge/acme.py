"""Certificates from an ACME CA for the edge: on demand, for agent ingresses, renewed.

Modelled on Caddy's on-demand TLS (certmagic):

- **On demand.**  The first HTTPS handshake for a name asks :meth:`EdgeAcme.context_for`.
  A name gets a certificate only if an ``https`` endpoint of some account (an agent's or
  a cloud endpoint) holds it right now; any other name gets ``None`` and the listener
  falls back to the local CA's certificate, so no ACME order is ever placed for a name
  nobody holds.  New names are rate-limited per account (a token bucket of
  ``acme_rate_limit`` per hour; renewals do not count).  The handshake waits up to
  ``acme_wait`` seconds for the order, then gets the local CA's certificate with a
  warning in the log while the order goes on; the next handshake gets the real one.
- **Agent ingresses** with a ``certificate_management_policy`` get a certificate for
  their names (``tunnel.<region>.<domain>`` and ``<domain>``), ordered in the
  background; the ingress's ``certificate_management_status`` shows the job in progress,
  the CA's error with its retry time, or the renewal date.  The ingress port presents
  that certificate to agents dialling those names.
- **Renewal** at two thirds of a certificate's lifetime, from one background loop;
  failures are retried with exponential backoff (``RETRY_BASE`` doubling to
  ``RETRY_MAX``), and an on-demand name in backoff is served by the local CA at once.
- **Storage.**  On-demand certificates are files in ``<data dir>/acme/certs`` (0600 in a
  0700 dir), the account key ``<data dir>/acme/account-*.json`` (0600); ingress
  certificates live with their ingress in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from backend import metrics
from backend.acme import AcmeClient, AcmeError, ChallengeAnswers, Issued, server_context, validity
from backend.connlimit import ThrottledLog
from backend.fsperm import private_dir
from backend.store import CertJob, IngressCertificate, NotFoundError
from backend.store.base import utcnow

if TYPE_CHECKING:
    from backend.edge.server import Edge
    from backend.store import AgentIngress

log = logging.getLogger("burrow.acme")
# said per handshake, which a client can repeat at will: at most once per 10 s per name
_per_handshake = ThrottledLog(log, 10.0)

#: First retry after a failed order, doubling per failure up to RETRY_MAX.
RETRY_BASE = 10.0
RETRY_MAX = 3600.0
#: The renewal loop looks at least this often (and at most every LOOP_MIN seconds).
LOOP_MAX = 3600.0
LOOP_MIN = 0.2


@dataclass
class Managed:
    """An on-demand certificate the edge holds for one name."""

    name: str
    account_id: str
    ctx: ssl.SSLContext
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def renew_at(self) -> dt.datetime:
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


class _Bucket:
    """A token bucket: ``rate`` tokens per hour, holding at most ``rate``."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate / 3600.0)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _Backoff:
    """Per-key retry times after failures: RETRY_BASE doubling to RETRY_MAX."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def failed(self, key: str) -> float:
        delay = min(RETRY_MAX, self._state[key][1] * 2) if key in self._state else RETRY_BASE
        self._state[key] = (time.monotonic() + delay, delay)
        return delay

    def ok(self, key: str) -> None:
        self._state.pop(key, None)

    def waiting(self, key: str) -> float:
        """Seconds until ``key`` may be tried again (0 if it may now)."""
        st = self._state.get(key)
        return max(0.0, st[0] - time.monotonic()) if st else 0.0


def ingress_names(edge: Edge, domain: str) -> list[str]:
    from backend.edge.api.agent_ingresses import region_domains

    return [*region_domains(edge, domain), domain]


class EdgeAcme:
    """The edge's ACME certificates: one per edge, created when ``acme_directory`` is set."""

    def __init__(self, edge: Edge) -> None:
        cfg = edge.config
        assert cfg.acme_directory
        self.edge = edge
        self.answers = ChallengeAnswers()
        kinds = tuple(k for k in cfg.acme_challenges if cfg.https_addr or k != "tls-alpn-01")
        if not kinds:
            raise ValueError("ACME needs a listener for its challenges: tls-alpn-01 needs --https-addr")
        self.dir = cfg.data_dir / "acme"
        self.client = AcmeClient(
            cfg.acme_directory,
            cfg.acme_email,
            self.dir,
            self.answers,
            ca_root=cfg.acme_ca_root,
            challenge_types=kinds,
        )
        self.certs_dir = self.dir / "certs"
        self.certs: dict[str, Managed] = {}
        self.ingress: dict[str, ssl.SSLContext] = {}  # ingress names -> their certificate
        self._ingress_names: dict[str, list[str]] = {}  # ingress id -> names
        self._ingress_due: dict[str, tuple[str, dt.datetime]] = {}  # id -> (account, when)
        self._inflight: dict[str, asyncio.Future] = {}
        self._backoff = _Backoff()
        self._buckets: dict[str, _Bucket] = {}
        self._wake = asyncio.Event()

    # -------------------------------------------------------------------- start
    async def start(self) -> None:
        private_dir(self.dir)
        private_dir(self.certs_dir)
        self._load_files()
        assert self.edge.store is not None
        now = utcnow()
        for ing in await self.edge.store.all_agent_ingresses():
            if ing.cert_policy is None:
                continue
            if ing.certificate is not None:
                self._serve_ingress(ing.id, ing.domain, ing.certificate)
                due = ing.certificate.renews_at
                if self._from_local_ca(ing.certificate):  # made before ACME was turned on
                    due = now
            else:
                due = (ing.cert_job.retries_at if ing.cert_job else None) or now
            self._ingress_due[ing.id] = (ing.account_id, due)
        self.edge._spawn(self._renew_loop())

    def _load_files(self) -> None:
        for path in sorted(self.certs_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                chain, key = data["chain_pem"].encode(), data["key_pem"].encode()
                not_before, not_after = validity(chain)
                ctx = server_context(chain, key)
            except (OSError, ValueError, KeyError, ssl.SSLError) as exc:
                log.warning("acme: ignoring unreadable certificate file %s: %s", path, exc)
                continue
            name = data.get("name") or path.stem
            self.certs[name] = Managed(name, data.get("account_id", ""), ctx, not_before, not_after)

    def _save(self, name: str, account_id: str, issued: Issued) -> None:
        body = json.dumps(
            {
                "name": name,
                "account_id": account_id,
                "chain_pem": issued.chain_pem.decode(),
                "key_pem": issued.key_pem.decode(),
            }
        ).encode()
        path = self.certs_dir / f"{name}.json"
        tmp = self.certs_dir / f".{name}.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)

    # ---------------------------------------------------------------- on demand
    def holder(self, name: str) -> str | None:
        """The account whose https endpoint (agent or cloud) holds ``name`` now, if any."""
        ep = self.edge.registry.route("public", "https", name)
        return ep.account_id if ep is not None else None

    async def context_for(self, name: str) -> ssl.SSLContext | None:
        """The ACME certificate's context for an HTTPS handshake naming ``name``, or None
        when the local CA's certificate must do (nobody holds the name, the account is
        over its rate, the order failed recently, or it is not ready within the wait)."""
        m = self.certs.get(name)
        now = utcnow()
        if m is not None and now < m.not_after:
            return m.ctx  # the renewal loop renews it in time
        account = self.holder(name)
        if account is None:
            return None
        fut = self._inflight.get(name)
        if fut is None:
            wait = self._backoff.waiting(name)
            if wait:
                _per_handshake.warning(
                    f"backoff {name}",
                    "acme: %s failed recently (next try in %.0fs); using the local CA's certificate", name, wait,
                )
                return None
            if m is None and not self._take(account):
                _per_handshake.warning(
                    f"rate {name}",
                    "acme: account %s is over its rate of %d new certificates per hour; %s gets "
                    "the local CA's certificate",
                    account, self.edge.config.acme_rate_limit, name,
                )
                return None
            fut = self._start(name, account)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.edge.config.acme_wait)
        except TimeoutError:
            log.warning(
                "acme: the certificate for %s is not ready after %.1fs; this handshake gets the "
                "local CA's certificate (the order goes on)", name, self.edge.config.acme_wait,
            )
            return None
        m = self.certs.get(name)
        return m.ctx if m is not None else None

    def _take(self, account: str) -> bool:
        rate = self.edge.config.acme_rate_limit
        if rate <= 0:
            return True
        bucket = self._buckets.get(account)
        if bucket is None:
            bucket = self._buckets[account] = _Bucket(rate)
        return bucket.take()

    def _start(self, name: str, account: str) -> asyncio.Future:
        fut = self.edge._spawn(self._order(name, account))  # cancelled when the edge stops
        self._inflight[name] = fut
        fut.add_done_callback(lambda f: self._finished(name, f))
        return fut

    async def _order(self, name: str, account: str) -> None:
        renewal = name in self.certs
        try:
            issued = await asyncio.to_thread(self.client.obtain, [name], "ecdsa")
            ctx = server_context(issued.chain_pem, issued.key_pem)
            await asyncio.to_thread(self._save, name, account, issued)
        except Exception as exc:  # AcmeError, or the file or the chain would not do
            metrics.ACME_FAILURES.inc()
            delay = self._backoff.failed(name)
            log.warning("acme: no certificate for %s: %s (next try in %.0fs)", name, exc, delay)
            self.edge.on_event({"event": "certificate_failed", "name": name, "error": str(exc)})
            self._wake.set()
            return
        self._backoff.ok(name)
        m = Managed(name, account, ctx, issued.not_before, issued.not_after)
        self.certs[name] = m
        log.info(
            "acme: certificate for %s %s, valid until %s, renews at %s",
            name, "renewed" if renewal else "obtained", issued.not_after, m.renew_at,
        )
        self.edge.on_event(
            {
                "event": "certificate_obtained",
                "name": name,
                "renewal": renewal,
                "challenges": list(issued.challenges),
                "not_after": issued.not_after.isoformat(),
                "renews_at": m.renew_at.isoformat(),
            }
        )
        self._wake.set()

    # ----------------------------------------------------------- agent ingresses
    def ingress_context(self, name: str) -> ssl.SSLContext | None:
        """For the ingress port's SNI callback: an agent ingress name's certificate."""
        return self.ingress.get(name)

    def ingress_changed(self, ing: AgentIngress | None, ingress_id: str) -> None:
        """The API created, updated or deleted an ingress (``ing`` None when deleted or
        its policy was removed): order its certificate now, or forget it."""
        if ing is None or ing.cert_policy is None:
            self._ingress_due.pop(ingress_id, None)
            for n in self._ingress_names.pop(ingress_id, []):
                self.ingress.pop(n, None)
            return
        if ing.certificate is None:
            self._ingress_due[ing.id] = (ing.account_id, utcnow())
            self._wake.set()

    def _from_local_ca(self, cert: IngressCertificate) -> bool:
        ca = self.edge.ca
        try:
            leaf = x509.load_pem_x509_certificate(cert.chain_pem.encode())
        except ValueError:
            return True
        return ca is not None and leaf.issuer == ca.cert.subject

    def _serve_ingress(self, ingress_id: str, domain: str, cert: IngressCertificate) -> None:
        try:
            ctx = server_context(cert.chain_pem.encode(), cert.key_pem.encode())
        except ssl.SSLError as exc:
            log.warning("acme: agent ingress %s has an unusable certificate: %s", ingress_id, exc)
            return
        names = ingress_names(self.edge, domain)
        for n in self._ingress_names.get(ingress_id, []):
            self.ingress.pop(n, None)
        self._ingress_names[ingress_id] = names
        for n in names:
            self.ingress[n] = ctx

    async def _provision_ingress(self, ingress_id: str, account_id: str) -> None:
        store = self.edge.store
        assert store is not None
        ing = await store.get_agent_ingress(account_id, ingress_id)
        if ing is None or ing.cert_policy is None:
            self.ingress_changed(None, ingress_id)
            return
        policy = ing.cert_policy
        started = utcnow()
        names = ingress_names(self.edge, ing.domain)
        try:
            issued = await asyncio.to_thread(self.client.obtain, names, policy.private_key_type)
            cert: IngressCertificate | None = IngressCertificate(
                chain_pem=issued.chain_pem.decode(),
                key_pem=issued.key_pem.decode(),
                not_after=issued.not_after,
                renews_at=issued.renew_at,
            )
            job = None
            self._backoff.ok(ingress_id)
        except AcmeError as exc:
            metrics.ACME_FAILURES.inc()
            delay = self._backoff.failed(ingress_id)
            log.warning("acme: no certificate for agent ingress %s (%s): %s", ing.domain, ingress_id, exc)
            cert = None
            job = CertJob(
                error_code="ERR_ACME_ORDER_FAILED",
                msg=f"The certificate could not be obtained from the ACME CA: {exc}",
                started_at=started,
                retries_at=started + dt.timedelta(seconds=delay),
            )
        # the ingress may have changed or gone while the order ran
        now = await store.get_agent_ingress(account_id, ingress_id)
        if now is None or now.cert_policy != policy:
            return
        changes: dict = {"cert_job": job}
        if cert is not None:
            changes["certificate"] = cert
        new = now.model_copy(update=changes)
        try:
            await store.update_agent_ingress(new)
        except NotFoundError:
            return
        if cert is not None:
            self._serve_ingress(ingress_id, new.domain, cert)
            self._ingress_due[ingress_id] = (account_id, cert.renews_at)
            log.info("acme: certificate for agent ingress %s obtained, renews at %s", new.domain, cert.renews_at)
            self.edge.on_event(
                {"event": "certificate_obtained", "name": new.domain, "ingress_id": ingress_id,
                 "challenges": list(issued.challenges), "not_after": cert.not_after.isoformat(),
                 "renews_at": cert.renews_at.isoformat()}
            )
        else:
            assert job is not None and job.retries_at is not None
            self._ingress_due[ingress_id] = (account_id, job.retries_at)

    # ------------------------------------------------------------------ renewal
    async def _renew_loop(self) -> None:
        while True:
            self._wake.clear()
            now = utcnow()
            next_at = now + dt.timedelta(seconds=LOOP_MAX)
            for name, m in list(self.certs.items()):
                if name in self._inflight:
                    continue
                if now < m.renew_at:
                    next_at = min(next_at, m.renew_at)
                    continue
                account = self.holder(name)
                if account is None:  # nobody holds it any more: let it lapse, then drop it
                    if now >= m.not_after:
                        self.certs.pop(name, None)
                        (self.certs_dir / f"{name}.json").unlink(missing_ok=True)
                    else:
                        next_at = min(next_at, m.not_after)
                    continue
                wait = self._backoff.waiting(name)
                if wait:
                    next_at = min(next_at, now + dt.timedelta(seconds=wait))
                    continue
                self._start(name, account)
            for ingress_id, (account, due) in list(self._ingress_due.items()):
                key = "ingress:" + ingress_id
                if key in self._inflight:
                    continue
                if now < due:
                    next_at = min(next_at, due)
                    continue
                fut = self.edge._spawn(self._provision_ingress(ingress_id, account))
                self._inflight[key] = fut
                fut.add_done_callback(lambda f, k=key: self._finished(k, f))
            left = (next_at - utcnow()).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(LOOP_MAX, max(LOOP_MIN, left)))

    def _finished(self, key: str, fut: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("acme: %s failed unexpectedly", key, exc_info=fut.exception())
        self._wake.set()
