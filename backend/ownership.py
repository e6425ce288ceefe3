"""Who owns a public name: the one place every path asks before it takes one.

A *name* is what an endpoint occupies (see :func:`name_of`):

- a public hostname, across every protocol and listener (``http``, ``https`` and
  ``tls`` endpoints on ``shop.example.com`` all occupy ``host:shop.example.com``);
- a public tcp port (``tcp:31000``);
- an internal name, which is per account (seed 004), so two accounts never collide
  on one (``internal:<account>:<host>`` or ``internal:<account>:<host>:<port>``).

A name belongs to one account at a time.  Inside that account, endpoints on the same
URL (the same name and protocol) may only share it when all of them enable pooling.

Ownership has two sources, and :meth:`Ownership.owner_of` consults both:

- *live claims*: endpoints being served right now (agent endpoints while their session
  lives, cloud endpoints while the edge serves them), held in memory by endpoint id;
- *durable reservations* in the store: hostnames reserved by cloud endpoints (the
  ``reserved_domains`` table), public tcp ports of cloud endpoints, and agent ingress
  domains, which give their whole subtree to their account.

The interface is small — :meth:`~Ownership.claim`, :meth:`~Ownership.release`,
:meth:`~Ownership.owner_of` (async where they may ask the store) — and the callers do
not know where claims live: in memory on a single edge, and with a shared store
(PostgreSQL, several edges) also in its ``claims`` table, taken in one transaction under
an advisory lock on the name (:meth:`backend.store.postgres.PostgresStore.claim_name`).

Sharing a name inside one account: every holder pools, or they are one agent (the same
client id: an HA agent's sessions on two edges bind the same URL).

:func:`agent_host_allowed` is the rule for which hostnames an agent may bind at all.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend.netutil import is_ip

if TYPE_CHECKING:
    from backend.store.aio import AsyncStore

log = logging.getLogger(__name__)

#: seconds a release of a shared claim is retried while the store is unreachable
RELEASE_RETRY_FOR = 120.0

__all__ = [
    "Holder",
    "NameConflict",
    "Ownership",
    "acl_allows",
    "agent_host_allowed",
    "check_sharing",
    "name_of",
    "other_account",
]


def name_of(binding: str, account_id: str, proto: str, host: str, port: int) -> str:
    """The name an endpoint occupies (what ownership is decided on)."""
    if binding == "internal":
        return f"internal:{account_id}:{host}:{port}" if proto == "tcp" else f"internal:{account_id}:{host}"
    if proto == "tcp":
        return f"tcp:{port}"
    return f"host:{host}"


@dataclass(frozen=True, slots=True)
class Holder:
    """One endpoint holding a name: its id, account, protocol and pooling flag.

    ``client_id`` is the agent's client id (agent endpoints): two sessions of one agent
    (an HA agent on two edges) may hold the same URL without pooling.
    """

    id: str
    account_id: str
    proto: str
    pooling: bool
    kind: str = "agent"  # agent | cloud
    client_id: str | None = None


class NameConflict(Exception):
    """A claim was refused.

    ``reason`` says why, so each caller can answer with its own error code:
    ``"other_account"`` (the name belongs to another account), ``"online"`` (the
    account's endpoint on the same URL does not pool, or the new one does not),
    ``"pooling_disabled"`` (the new one pools but the one online does not).
    """

    def __init__(self, reason: str, name: str, msg: str, other: Holder | None = None) -> None:
        super().__init__(msg)
        self.reason = reason
        self.name = name
        self.other = other  # the endpoint in the way, when it is live

    @property
    def is_tcp(self) -> bool:
        return self.name.startswith("tcp:")


def other_account(name: str) -> NameConflict:
    what = f"tcp port {name[4:]}" if name.startswith("tcp:") else f"the hostname {name.split(':')[-1]}"
    return NameConflict("other_account", name, f"{what} belongs to another account.")


def check_sharing(name: str, holder: Holder, others) -> None:
    """Raise :class:`NameConflict` unless ``holder`` may join ``others`` (same account) on
    ``name``: all pool, or the other one is the same agent (same client id)."""
    for other in others:
        if other.id == holder.id:
            continue
        if other.account_id != holder.account_id:  # (came in while the owner was looked up)
            raise other_account(name)
        if other.proto != holder.proto:
            continue
        if holder.client_id is not None and other.client_id == holder.client_id:
            continue  # one agent's sessions on two edges
        if not holder.pooling:
            raise NameConflict("online", name, "an endpoint is already online on this URL.", other)
        if not other.pooling:
            raise NameConflict(
                "pooling_disabled", name, "the endpoint online on this URL has pooling disabled.", other
            )


class Ownership:
    """The edge's table of names, their owners and their holders.

    With a shared store (PostgreSQL, several edges) the live claims of agent endpoints
    are also rows of the store's ``claims`` table, taken under an advisory lock on the
    name, so two edges can never give one name to two accounts; this edge's own
    claims stay in memory too (``names_of``, release).  Cloud endpoints are claimed in
    memory on every edge that serves them; their durable half (reserved hostnames, tcp
    ports) is checked by the store in the same lock.
    """

    def __init__(self, store: AsyncStore | None = None, node_id: str | None = None) -> None:
        self.store = store
        self.node_id = node_id
        self._live: dict[str, dict[str, Holder]] = {}
        self._held: dict[str, str] = {}  # holder id -> the name it holds
        self._by_account: dict[str, set[str]] = {}
        self._shared: dict[str, str] = {}  # holder id -> name, claims kept in the store
        self._tasks: set[asyncio.Task] = set()

    @property
    def shared(self) -> bool:
        return self.store is not None and self.store.shared

    # ------------------------------------------------------------------ interface
    async def owner_of(self, name: str) -> str | None:
        """The account that owns ``name`` (live or reserved), or None if it is free."""
        holders = self._live.get(name)
        if holders:
            return next(iter(holders.values())).account_id
        if self.shared and not name.startswith("internal:"):
            owner = await self.store.claim_owner(name)
            if owner is not None:
                return owner
        return await self._reserved_by(name)

    async def claim(self, name: str, holder: Holder) -> None:
        """Give ``name`` to ``holder`` (raises :class:`NameConflict`).

        Claiming again with the same holder id is a no-op; claiming a different name
        with it moves the claim (a cloud endpoint whose URL changed).
        """
        owner = await self.owner_of(name)
        if owner is not None and owner != holder.account_id:
            raise other_account(name)
        check_sharing(name, holder, self._live.get(name, {}).values())
        if self.shared and not name.startswith("internal:"):
            if holder.kind == "agent":
                # the authoritative check, in the store, under the name's lock
                await self.store.claim_name(name, holder, self.node_id)
                self._shared[holder.id] = name
            else:
                check_sharing(name, holder, await self.store.claim_holders(name))
        self.hold(name, holder)

    def hold(self, name: str, holder: Holder) -> None:
        """Record in memory a claim the store already granted, without checking again: a
        cloud endpoint another edge of the cluster created (its create checked the name
        under the name's lock).  The cluster's change feed uses it (backend/cluster/feed.py)."""
        old = self._held.get(holder.id)
        if old is not None and old != name:
            self.release(holder.id)
        self._live.setdefault(name, {})[holder.id] = holder
        self._held[holder.id] = name
        if not name.startswith("internal:"):
            self._by_account.setdefault(holder.account_id, set()).add(name)

    def release(self, holder_id: str) -> None:
        """Drop whatever ``holder_id`` holds (idempotent).

        A claim kept in the shared store is deleted there in the background (in order
        per holder: a later claim of the same id waits for nothing, since ids are new
        for every endpoint); should this edge die first, the janitor deletes it.
        """
        if self._shared.pop(holder_id, None) is not None and self.store is not None:
            t = asyncio.ensure_future(self._release_shared(holder_id))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        name = self._held.pop(holder_id, None)
        if name is None:
            return
        holders = self._live.get(name)
        if holders is None:
            return
        h = holders.pop(holder_id, None)
        if not holders:
            del self._live[name]
            if h is not None:
                names = self._by_account.get(h.account_id)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._by_account[h.account_id]

    async def _release_shared(self, holder_id: str) -> None:
        """Delete the holder's claim rows, retrying while PostgreSQL is away (up to
        RELEASE_RETRY_FOR seconds; past that, or if this edge dies, the janitor's)."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        deadline, delay, warned = loop.time() + RELEASE_RETRY_FOR, 0.2, False
        while True:
            try:
                await self.store.release_claim(holder_id)
                return
            except Exception as exc:
                if loop.time() + delay > deadline:
                    log.warning("claim of %s not released in the store: %s", holder_id, exc)
                    return
                if not warned:
                    log.info("claim of %s: store unavailable, retrying the release: %s", holder_id, exc)
                    warned = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def settle(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout`` seconds) for the background releases started so
        far, then cancel those still retrying (shutdown, tests)."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    # -------------------------------------------------------------------- helpers
    def names_of(self, account_id: str, prefix: str = "") -> int:
        """How many public names (optionally only ``tcp:``/``host:``) the account holds live."""
        return sum(1 for n in self._by_account.get(account_id, ()) if n.startswith(prefix))

    async def _reserved_by(self, name: str) -> str | None:
        if self.store is None or name.startswith("internal:"):
            return None
        if name.startswith("tcp:"):
            return await self.store.public_tcp_port_owner(int(name[4:]))
        host = name[5:]
        owner = await self.store.public_host_owner(host)
        if owner is not None:
            return owner
        ing = await self._ingress_over(host)
        return ing.account_id if ing is not None else None

    async def _ingress_over(self, host: str):
        """The agent ingress whose domain is ``host`` or a parent of it, if any."""
        assert self.store is not None
        labels = host.removeprefix("*.").split(".")
        for i in range(len(labels) - 1):
            ing = await self.store.find_agent_ingress(".".join(labels[i:]))
            if ing is not None:
                return ing
        return None

    async def account_owns_domain(self, account_id: str, domain: str) -> bool:
        """True if the account has reserved ``domain`` or it is (under) its agent ingress."""
        if self.store is None:
            return False
        if await self.store.public_host_owner(domain) == account_id:
            return True
        ing = await self._ingress_over(domain)
        return ing is not None and ing.account_id == account_id


async def agent_host_allowed(own: Ownership, edge_domain: str, account_id: str, host: str) -> str | None:
    """Why an agent of ``account_id`` may not bind public ``host`` (None if it may).

    Allowed: names under the edge's domain, and names the account owns (a hostname
    it reserved, or one under its agent ingress domain).  Never an IP literal,
    ``localhost`` or the edge's own domain.  A wildcard ``*.<parent>`` only where the
    account owns ``<parent>``, so never ``*.<edge domain>``.
    """
    bare = host.removeprefix("*.")
    if is_ip(bare) or bare == "localhost" or bare == edge_domain:
        return f"{host!r} is not a name an agent may bind"
    if host.startswith("*."):
        if await own.account_owns_domain(account_id, bare):
            return None
        return f"a wildcard needs a domain your account owns; {bare!r} is not one"
    if host.endswith("." + edge_domain):
        return None
    if bare.endswith(".localhost"):
        return f"{host!r} is not a name an agent may bind"
    if await own.account_owns_domain(account_id, host):
        return None
    return f"{host!r} is neither under {edge_domain} nor a domain your account owns"


def acl_allows(acl: list[str] | tuple[str, ...], proto: str, host: str, port: int, tcp_host: str) -> bool:
    """Does a credential's ACL allow binding this endpoint?  ngrok's rules.

    No rules, ``*`` or ``bind:*``: anything.  ``bind:<hostname>``: that name.
    ``bind:*.<domain>``: names under ``<domain>`` (and the wildcard itself).
    ``bind:<name>.internal``: that internal name.  ``bind:<host>:<port>``: that tcp
    address.  Label rules (``bind:k=v``) match nothing here: burrow has no labeled
    endpoints.  A tcp bind needs a matching address rule.
    """
    if not acl:
        return True
    target = f"{tcp_host}:{port}" if proto == "tcp" and not host.endswith(".internal") else host
    for rule in acl:
        rule = rule.strip().lower()
        if rule in ("*", "bind:*"):
            return True
        if not rule.startswith("bind:"):
            continue
        value = rule[5:].rstrip(".")
        if "=" in value:
            continue
        if value == target:
            return True
        if value.startswith("*.") and ":" not in value and proto != "tcp":
            parent = value[2:]
            if target.endswith("." + parent):
                return True
        if proto == "tcp" and host.endswith(".internal") and value == f"{host}:{port}":
            return True
    return False
