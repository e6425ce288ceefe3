"""Accounts for self-hosting: create, list, disable and enable them.

One module for both ways in: ``burrow admin account ...`` (on the data dir's store) and
the admin API (``/admin/accounts``, on a running edge).  Rules:

- A new account gets one authtoken and one API key; they are shown once and only their
  hashes are stored (as every secret in the store).
- Names are unique (an administrator refers to an account by name or id).
- A disabled account's API keys get 401 ``ERR_NGROK_205`` from the cloud API, its
  authtokens fail the agent's Auth with ``ERR_NGROK_338``, its live agent sessions end
  (a burrow agent is told why and exits; an ngrok agent reconnects and is refused), and
  its cloud endpoints stop serving.  It keeps its names: nobody else can take them.
  Enabling it again brings its cloud endpoints back.

The store owns the rule "a disabled account's secrets are not found"; the edge only
turns the effects on live state.  A running edge applies a change made through the
admin API at once, and one made by the CLI on its data dir within
:data:`WATCH_INTERVAL` seconds (:func:`watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend import protocol as p
from backend.store import Account, AsyncStore, Store
from backend.store.base import ACCOUNT_PREFIX, new_token

if TYPE_CHECKING:
    from backend.edge.server import Edge

__all__ = [
    "AGENT_CODE",
    "API_CODE",
    "AccountError",
    "Created",
    "acreate",
    "arefusal",
    "aresolve",
    "create",
    "cut_off",
    "disabled_message",
    "refusal",
    "resolve",
    "restore",
    "watch",
]

log = logging.getLogger("burrow.accounts")

#: ngrok's codes for a suspended account: in the API, and for an agent session
API_CODE = "ERR_NGROK_205"
AGENT_CODE = "ERR_NGROK_338"
MAX_NAME = 64
#: seconds between the edge's looks at the store for accounts disabled from outside
WATCH_INTERVAL = 1.0


class AccountError(Exception):
    """A refused account operation: ``kind`` is ``invalid``, ``exists`` or ``not_found``."""

    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


@dataclass(frozen=True)
class Created:
    account: Account
    authtoken: str
    api_key: str


def disabled_message(account: Account) -> str:
    return (
        f"The account '{account.name}' ({account.id}) has been disabled by this edge's "
        "administrator."
    )


def refusal(store: Store, token: str) -> str | None:
    """Why ``token`` (a secret the store did not find) is refused, if its account is
    disabled; None when it is simply unknown."""
    acct = store.disabled_owner(token) if token else None
    return disabled_message(acct) if acct is not None else None


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise AccountError("invalid", f"an account name is 1 to {MAX_NAME} printable characters")
    if name.startswith(ACCOUNT_PREFIX + "_"):
        raise AccountError("invalid", f"an account name may not start with {ACCOUNT_PREFIX}_ (ids do)")
    return name


def create(store: Store, name: str) -> Created:
    """Create an account with one authtoken and one API key (returned, stored hashed)."""
    name = _check_name(name)
    if any(a.name == name for a in store.list_accounts()):
        raise AccountError("exists", f"an account named {name!r} exists already")
    account = store.create_account(name)
    authtoken, api_key = new_token("bat"), new_token("bak")
    store.add_authtoken(account.id, authtoken, description=f"created with the account {name}")
    store.add_api_key(account.id, api_key, description=f"created with the account {name}")
    return Created(account, authtoken, api_key)


def resolve(store: Store, ref: str) -> Account:
    """The account with id ``ref``, else the one named ``ref``."""
    ref = ref.strip()
    if ref.startswith(ACCOUNT_PREFIX + "_"):
        acct = store.get_account(ref)
        if acct is not None:
            return acct
        raise AccountError("not_found", f"no account with id {ref!r}")
    named = [a for a in store.list_accounts() if a.name == ref]
    if not named:
        raise AccountError("not_found", f"no account named {ref!r}")
    if len(named) > 1:  # only from stores written before names were unique
        raise AccountError("invalid", f"{len(named)} accounts are named {ref!r}; use the id")
    return named[0]


# the same, on the edge's (async) store
async def arefusal(store: AsyncStore, token: str) -> str | None:
    """Why ``token`` (a secret the store did not find) is refused, if its account is
    disabled; None when it is simply unknown."""
    acct = await store.disabled_owner(token) if token else None
    return disabled_message(acct) if acct is not None else None


async def acreate(store: AsyncStore, name: str) -> Created:
    """Create an account with one authtoken and one API key (returned, stored hashed)."""
    name = _check_name(name)
    if any(a.name == name for a in await store.list_accounts()):
        raise AccountError("exists", f"an account named {name!r} exists already")
    account = await store.create_account(name)
    authtoken, api_key = new_token("bat"), new_token("bak")
    await store.add_authtoken(account.id, authtoken, description=f"created with the account {name}")
    await store.add_api_key(account.id, api_key, description=f"created with the account {name}")
    return Created(account, authtoken, api_key)


async def aresolve(store: AsyncStore, ref: str) -> Account:
    """The account with id ``ref``, else the one named ``ref``."""
    ref = ref.strip()
    if ref.startswith(ACCOUNT_PREFIX + "_"):
        acct = await store.get_account(ref)
        if acct is not None:
            return acct
        raise AccountError("not_found", f"no account with id {ref!r}")
    named = [a for a in await store.list_accounts() if a.name == ref]
    if not named:
        raise AccountError("not_found", f"no account named {ref!r}")
    if len(named) > 1:  # only from stores written before names were unique
        raise AccountError("invalid", f"{len(named)} accounts are named {ref!r}; use the id")
    return named[0]


# ---------------------------------------------------------------- effects on an edge
def cut_off(edge: Edge, account: Account) -> int:
    """End the account's live sessions and stop serving its cloud endpoints; return how
    many sessions ended."""
    msg = disabled_message(account)
    sessions = [s for s in edge.registry.sessions.values() if s.account_id == account.id]
    for s in sessions:
        s.send(p.Error(code=AGENT_CODE, msg=msg))  # a burrow agent stops for good on it
        edge._end_session(s, "account disabled")
    for ep in edge.registry.endpoints():
        if ep.session is None and ep.account_id == account.id:
            edge.unserve_cloud_endpoint(ep.id)
    if sessions:
        log.info("account %s disabled: %d agent sessions ended", account.id, len(sessions))
    return len(sessions)


async def restore(edge: Edge, account: Account) -> None:
    """Serve an account's cloud endpoints again (after it was enabled)."""
    assert edge.store is not None
    for rec in await edge.store.list_cloud_endpoints(account.id):
        if edge.registry.find(rec.id) is not None:
            continue
        try:
            await edge.serve_cloud_endpoint(rec)
        except Exception as exc:  # one broken endpoint must not keep the others down
            log.error("cloud endpoint %s (%s) is not served: %s", rec.id, rec.url, exc)


async def watch(edge: Edge, interval: float = WATCH_INTERVAL) -> None:
    """Apply accounts disabled or enabled in the store by another process (the CLI)."""
    seen: set[str] | None = None
    while True:
        await asyncio.sleep(interval)
        if edge.store is None:
            continue
        try:
            ids = await edge.store.disabled_account_ids()
        except Exception as exc:  # a store that failed: say so, try again later
            log.warning("cannot read disabled accounts: %s", exc)
            continue
        live = {s.account_id for s in edge.registry.sessions.values()}
        live |= {ep.account_id for ep in edge.registry.endpoints() if ep.session is None}
        for account_id in ids & live:
            acct = await edge.store.get_account(account_id)
            if acct is not None:
                cut_off(edge, acct)
        if seen is not None:
            for account_id in seen - ids:
                acct = await edge.store.get_account(account_id)
                if acct is not None:
                    with contextlib.suppress(Exception):
                        await restore(edge, acct)
        seen = ids
