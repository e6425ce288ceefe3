"""``/agent_ingresses``: a user's own domains through which agents reach the edge.

``region_domains`` are ``tunnel.<region>.<domain>`` for the edge's region; ``ns_targets``
are the name servers configured on the edge (``EdgeConfig.ns_targets``).

Certificate management: with a ``certificate_management_policy`` the edge provisions a
certificate for the ingress's names with the requested key type.  With an ACME CA
configured (``burrow serve --acme-directory``) the order runs in the background
(:mod:`backend.edge.acme`): ``certificate_management_status`` shows the job in progress,
then the renewal date (two thirds of the lifetime), or the CA's error and the retry
time.  Without one, the edge's own local CA issues it at once.  The certificate and its
key are kept in the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import TYPE_CHECKING

from cryptography import x509

from backend.edge.api.core import (
    MAX_DESCRIPTION,
    MAX_METADATA,
    APIError,
    caller,
    check_id,
    check_text,
    dump,
    handler,
    not_found,
    page_params,
    paged,
    parse_body,
)
from backend.edge.api.filtering import wire_obj
from backend.httpserver import Request, Response, Router, empty
from backend.ids import new_id
from backend.netutil import is_ip, valid_hostname
from backend.schema import cloud as w
from backend.store import (
    AgentIngress,
    CertJob,
    CertPolicy,
    ConflictError,
    IngressCertificate,
    NotFoundError,
)
from backend.store.base import AGENT_INGRESS_PREFIX, utcnow

if TYPE_CHECKING:
    from backend.edge.server import Edge

log = logging.getLogger("burrow.api")

AUTHORITIES = ("letsencrypt",)
KEY_TYPES = ("rsa", "ecdsa")
#: Renew this long before the certificate expires.
RENEW_BEFORE = dt.timedelta(days=30)
#: The job an ACME order shows while it runs in the background.
ACME_IN_PROGRESS = "Managed certificate provisioning in progress."
#: A failed provisioning job says it will be retried after this long.
RETRY_AFTER = dt.timedelta(minutes=5)


def _bad(msg: str, code: str = "ERR_NGROK_215") -> APIError:
    return APIError(400, code, msg)


def region_domains(edge: Edge, domain: str) -> list[str]:
    return [f"tunnel.{edge.config.region}.{domain}"]


def check_domain(edge: Edge, raw: str) -> str:
    domain = raw.strip().lower().rstrip(".")
    if not domain:
        raise _bad("Parameter 'domain' is required: a domain you own, e.g. connect.example.com.")
    if domain.startswith("*.") or is_ip(domain) or not valid_hostname(domain) or "." not in domain:
        raise _bad(f"Invalid domain {raw[:80]!r}: expected a DNS name such as connect.example.com.")
    if len(domain) > 253 - len("tunnel..") - len(edge.config.region):
        raise _bad(
            f"Domain {domain!r} is too long for its regional names (tunnel.<region>.<domain>)."
        )
    if domain == "internal" or domain.endswith(".internal"):
        raise _bad(".internal names cannot be agent ingress domains.")
    own = edge.config.domain
    if domain == own or domain.endswith("." + own):
        raise _bad(
            f'The agent ingress domain "{domain}" must be a third party domain, not one this edge '
            f"controls ({own}).",
            "ERR_NGROK_6705",
        )
    return domain


def check_policy(body: w.AgentIngressCertPolicyBody) -> CertPolicy:
    authority = body.authority or "letsencrypt"
    key_type = body.private_key_type or "rsa"
    if authority not in AUTHORITIES:
        raise _bad(
            f"Invalid certificate authority {authority[:40]!r}: the only supported value is letsencrypt."
        )
    if key_type not in KEY_TYPES:
        raise _bad(f"Invalid private_key_type {key_type[:40]!r}: expected rsa or ecdsa.")
    return CertPolicy(authority=authority, private_key_type=key_type)


async def provision(
    edge: Edge, names: list[str], policy: CertPolicy
) -> tuple[IngressCertificate | None, CertJob | None]:
    """Issue a certificate for ``names`` from the edge's CA; a failure becomes a job.

    With an ACME CA the answer is a job in progress: the edge orders in the background.
    """
    started = utcnow()
    if edge.acme is not None:
        return None, CertJob(msg=ACME_IN_PROGRESS, started_at=started)
    try:
        if edge.ca is None:
            raise RuntimeError("the edge has no certificate authority loaded")
        chain, key = await asyncio.to_thread(edge.ca.issue, names, policy.private_key_type)
        leaf = x509.load_pem_x509_certificate(chain)
        not_after = leaf.not_valid_after_utc.replace(microsecond=0)
        renews_at = max(started, not_after - RENEW_BEFORE)
        cert = IngressCertificate(
            chain_pem=chain.decode(), key_pem=key.decode(), not_after=not_after, renews_at=renews_at
        )
        return cert, None
    except Exception as exc:  # the status reports it; the API call itself succeeds
        log.exception("certificate provisioning for %s failed", names)
        return None, CertJob(
            error_code="INTERNAL_ERROR",
            msg=f"provisioning with the edge's CA failed: {exc}",
            started_at=started,
            retries_at=started + RETRY_AFTER,
        )


def wire(edge: Edge, base: str, ing: AgentIngress) -> w.AgentIngress:
    policy = status = None
    if ing.cert_policy is not None:
        policy = w.AgentIngressCertPolicy(
            authority=ing.cert_policy.authority, private_key_type=ing.cert_policy.private_key_type
        )
        job = None
        if ing.cert_job is not None:
            job = w.AgentIngressCertJob(**ing.cert_job.model_dump())
        status = w.AgentIngressCertStatus(
            renews_at=ing.certificate.renews_at if ing.certificate else None, provisioning_job=job
        )
    return w.AgentIngress(
        id=ing.id,
        uri=f"{base}/agent_ingresses/{ing.id}",
        description=ing.description or None,
        metadata=ing.metadata or None,
        domain=ing.domain,
        ns_targets=list(edge.config.ns_targets),
        region_domains=region_domains(edge, ing.domain),
        created_at=ing.created_at,
        certificate_management_policy=policy,
        certificate_management_status=status,
    )


class AgentIngressesAPI:
    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @property
    def store(self):
        assert self.edge.store is not None
        return self.edge.store

    def register(self, router: Router) -> None:
        router.add("GET", "/agent_ingresses", handler(self.list))
        router.add("POST", "/agent_ingresses", handler(self.create))
        router.add("GET", "/agent_ingresses/{id}", handler(self.get))
        router.add("PATCH", "/agent_ingresses/{id}", handler(self.update))
        router.add("DELETE", "/agent_ingresses/{id}", handler(self.delete))

    def _names(self, domain: str) -> list[str]:
        return [*region_domains(self.edge, domain), domain]

    async def list(self, req: Request) -> Response:
        who = caller(req)
        page = page_params(req, item=w.AgentIngress)
        rows = await self.store.list_agent_ingresses(
            who.account_id, before_id=page.before_id, limit=page.store_limit
        )
        items = page.select([wire(self.edge, req.base_url, r) for r in rows], wire_obj)
        items, next_uri = paged(req, page, items)
        return dump(
            w.AgentIngressList(
                ingresses=items,
                uri=f"{req.base_url}/agent_ingresses",
                next_page_uri=next_uri,
            )
        )

    async def get(self, req: Request) -> Response:
        who = caller(req)
        id_ = check_id(req.params["id"], AGENT_INGRESS_PREFIX, "agent ingress")
        ing = await self.store.get_agent_ingress(who.account_id, id_)
        if ing is None:
            raise not_found("agent ingress", id_)
        return dump(wire(self.edge, req.base_url, ing))

    async def create(self, req: Request) -> Response:
        who = caller(req)
        body = parse_body(req, w.AgentIngressCreate)
        domain = check_domain(self.edge, body.domain)
        check_text("description", body.description, MAX_DESCRIPTION)
        check_text("metadata", body.metadata, MAX_METADATA)
        policy = (
            check_policy(body.certificate_management_policy)
            if body.certificate_management_policy
            else None
        )
        if await self.store.find_agent_ingress(domain) is not None:  # answer before the slow part
            raise APIError(
                409,
                "ERR_NGROK_6706",
                f'The agent ingress domain "{domain}" already exists, choose another domain.',
            )
        cert = job = None
        if policy is not None:
            cert, job = await provision(self.edge, self._names(domain), policy)
        ing = AgentIngress(
            id=new_id(AGENT_INGRESS_PREFIX),
            account_id=who.account_id,
            domain=domain,
            description=body.description or "",
            metadata=body.metadata or "",
            created_at=utcnow(),
            cert_policy=policy,
            certificate=cert,
            cert_job=job,
        )
        try:
            await self.store.create_agent_ingress(ing)
        except ConflictError as exc:
            raise APIError(409, "ERR_NGROK_6706", str(exc)) from None
        if self.edge.acme is not None:
            self.edge.acme.ingress_changed(ing, ing.id)
        return dump(wire(self.edge, req.base_url, ing), 201)

    async def update(self, req: Request) -> Response:
        who = caller(req)
        id_ = check_id(req.params["id"], AGENT_INGRESS_PREFIX, "agent ingress")
        body = parse_body(req, w.AgentIngressUpdate)
        ing = await self.store.get_agent_ingress(who.account_id, id_)
        if ing is None:
            raise not_found("agent ingress", id_)
        check_text("description", body.description, MAX_DESCRIPTION)
        check_text("metadata", body.metadata, MAX_METADATA)
        changes: dict = {}
        if body.description is not None:
            changes["description"] = body.description
        if body.metadata is not None:
            changes["metadata"] = body.metadata
        if "certificate_management_policy" in body.model_fields_set:
            if body.certificate_management_policy is None:  # explicit null: turn it off
                changes.update(cert_policy=None, certificate=None, cert_job=None)
            else:
                policy = check_policy(body.certificate_management_policy)
                if policy != ing.cert_policy or ing.certificate is None:
                    cert, job = await provision(self.edge, self._names(ing.domain), policy)
                    changes.update(cert_policy=policy, certificate=cert, cert_job=job)
        new = ing.model_copy(update=changes)
        try:
            await self.store.update_agent_ingress(new)
        except NotFoundError:
            raise not_found("agent ingress", id_) from None
        if self.edge.acme is not None and "cert_policy" in changes:
            self.edge.acme.ingress_changed(new, new.id)
        return dump(wire(self.edge, req.base_url, new))

    async def delete(self, req: Request) -> Response:
        who = caller(req)
        id_ = check_id(req.params["id"], AGENT_INGRESS_PREFIX, "agent ingress")
        if not await self.store.delete_agent_ingress(who.account_id, id_):
            raise not_found("agent ingress", id_)
        if self.edge.acme is not None:
            self.edge.acme.ingress_changed(None, id_)
        return empty(204)
