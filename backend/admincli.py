"""``burrow admin account create|list|disable|enable``: accounts of a self-hosted edge.

Two ways to reach them:

- **the data dir** (default; ``--data-dir``, or ``data_dir`` of ``--config serve.yml``):
  opens the edge's SQLite store directly, as the user the edge runs as.  A running edge
  sees a new account at once (secrets are looked up per request) and applies a disable
  or enable within a second (it polls the store), so it need not be stopped.
- **the admin API** of a running edge (``--api-url URL`` with ``--admin-key`` or
  ``BURROW_ADMIN_KEY``): the same operations over HTTP, applied at once.  Use this when
  the edge runs as a service user whose files you should not touch (systemd's
  ``DynamicUser``).

A new account's authtoken and API key are printed once; only their hashes are stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


class AdminError(Exception):
    pass


def add_parser(sub, parser_class) -> None:
    a = sub.add_parser("admin", help="administer a self-hosted edge: accounts")
    asub = a.add_subparsers(dest="admin_command", parser_class=parser_class, required=True)
    acc = asub.add_parser("account", help="create, list, disable or enable accounts")
    csub = acc.add_subparsers(dest="account_command", parser_class=parser_class, required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None, help="the edge's data dir")
        p.add_argument("--config", type=Path, default=None, help="the edge's serve.yml (for its data_dir)")
        p.add_argument("--store", default=None, metavar="URL",
                       help="a cluster's PostgreSQL (postgresql://...; default BURROW_STORE, then the config's store)")
        p.add_argument("--api-url", default=None, help="use a running edge's admin API at this URL instead")
        p.add_argument("--admin-key", default=None, help="the admin key for --api-url (better: BURROW_ADMIN_KEY; a flag shows in ps)")
        p.add_argument("--json", action="store_true", help="print JSON")

    p = csub.add_parser("create", help="create an account; prints its authtoken and API key once")
    p.add_argument("name")
    common(p)
    common(csub.add_parser("list", help="list accounts"))
    for verb in ("disable", "enable"):
        p = csub.add_parser(verb, help=f"{verb} an account (by name or id)")
        p.add_argument("account", metavar="NAME|ID")
        common(p)


def run(args) -> int:
    try:
        result = _over_api(args) if args.api_url else _on_store(args)
    except AdminError as exc:
        print(f"burrow admin: error: {exc}", file=sys.stderr)
        return 1
    _print(args, result)
    return 0


# ------------------------------------------------------------------------ the store
def _data_dir(args) -> Path:
    from backend.cli import default_data_dir

    if args.data_dir is not None:
        return args.data_dir.expanduser()
    if args.config is not None:
        from backend import serveconfig

        try:
            conf = serveconfig.load({}, args.config)
        except serveconfig.ServeConfigError as exc:
            raise AdminError(str(exc)) from None
        if conf.data_dir is not None:
            return conf.data_dir.expanduser()
    return default_data_dir()


def _store_url(args) -> str | None:
    """The PostgreSQL store to administer (cluster mode), if any: --store, BURROW_STORE,
    then the serve.yml's ``store``."""
    url = getattr(args, "store", None) or os.environ.get("BURROW_STORE")
    if not url and args.config is not None:
        from backend import serveconfig

        try:
            url = serveconfig.load({}, args.config).store
        except serveconfig.ServeConfigError as exc:
            raise AdminError(str(exc)) from None
    return url if url and url.startswith(("postgresql://", "postgres://")) else None


def _on_postgres(args, url: str):
    import asyncio

    from backend.edge import accounts
    from backend.store import StoreError, open_edge_store

    async def run():
        store = await open_edge_store(url)
        try:
            if args.account_command == "create":
                made = await accounts.acreate(store, args.name)
                return {**_view(made.account), "authtoken": made.authtoken, "api_key": made.api_key}
            if args.account_command == "list":
                return [_view(a) for a in await store.list_accounts()]
            acct = await accounts.aresolve(store, args.account)
            # every edge applies it within accounts.WATCH_INTERVAL (it polls the store)
            return _view(await store.set_account_disabled(acct.id, args.account_command == "disable") or acct)
        finally:
            await store.aclose()

    try:
        return asyncio.run(run())
    except accounts.AccountError as exc:
        raise AdminError(str(exc)) from None
    except StoreError as exc:
        raise AdminError(str(exc)) from None


def _on_store(args):
    import sqlite3

    url = _store_url(args)
    if url is not None:
        return _on_postgres(args, url)

    from backend.edge import accounts
    from backend.store import SQLiteStore, StoreError

    db = _data_dir(args) / "burrow.db"
    if not db.is_file():
        raise AdminError(f"no edge data at {db} (run burrow serve once, or pass --data-dir / --config)")
    try:
        store = SQLiteStore(db)
    except (sqlite3.Error, StoreError, OSError) as exc:
        raise AdminError(f"{db}: {exc}") from None
    with store:
        try:
            if args.account_command == "create":
                made = accounts.create(store, args.name)
                return {**_view(made.account), "authtoken": made.authtoken, "api_key": made.api_key}
            if args.account_command == "list":
                return [_view(a) for a in store.list_accounts()]
            acct = accounts.resolve(store, args.account)
            acct = store.set_account_disabled(acct.id, args.account_command == "disable") or acct
            return _view(acct)
        except accounts.AccountError as exc:
            raise AdminError(str(exc)) from None
        except (sqlite3.Error, StoreError) as exc:
            raise AdminError(f"{db}: {exc}") from None


def _view(acct) -> dict:
    from backend.store.base import format_timestamp

    return {
        "id": acct.id,
        "name": acct.name,
        "created_at": format_timestamp(acct.created_at),
        "disabled_at": format_timestamp(acct.disabled_at) if acct.disabled_at else None,
    }


# ------------------------------------------------------------------- the admin API
def _over_api(args):
    import httpx

    key = args.admin_key or os.environ.get("BURROW_ADMIN_KEY")
    if not key:
        raise AdminError("--api-url needs --admin-key (or BURROW_ADMIN_KEY)")
    base = args.api_url.rstrip("/")
    from urllib.parse import quote

    cmd = args.account_command
    if cmd == "create":
        method, path, body = "POST", "/admin/accounts", {"name": args.name}
    elif cmd == "list":
        method, path, body = "GET", "/admin/accounts", None
    else:
        method, path, body = "POST", f"/admin/accounts/{quote(args.account, safe='')}/{cmd}", None
    try:
        r = httpx.request(method, base + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    except httpx.HTTPError as exc:
        raise AdminError(f"{base}: {exc}") from None
    try:
        data = r.json()
    except ValueError:
        raise AdminError(f"{base}: answered {r.status_code} without JSON") from None
    if r.status_code >= 400:
        raise AdminError(f"{data.get('msg', r.status_code)} ({data.get('error_code', r.status_code)})")
    if cmd == "list":
        return list(reversed(data["accounts"]))
    return data


# --------------------------------------------------------------------------- output
def _print(args, result) -> None:
    if args.json:
        print(json.dumps(result))
        return
    if args.account_command == "list":
        print(f"{'ID':<32} {'NAME':<24} {'CREATED':<21} STATE")
        for a in result:
            state = f"disabled {a['disabled_at']}" if a["disabled_at"] else "enabled"
            print(f"{a['id']:<32} {a['name']:<24} {a['created_at']:<21} {state}")
        return
    if args.account_command == "create":
        print(f"account    {result['id']}  {result['name']}")
        print(f"authtoken  {result['authtoken']}")
        print(f"API key    {result['api_key']}")
        print("(the authtoken and API key are shown once; only their hashes are stored)")
        return
    state = "disabled" if result["disabled_at"] else "enabled"
    print(f"account {result['name']} ({result['id']}) {state}")
    if not args.api_url:
        print("(a running edge applies this within a second)")
