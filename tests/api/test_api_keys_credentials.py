"""/credentials (authtokens) and /api_keys: minted by the API, shown once, stored hashed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import ngrok
import pytest

from backend.store import hash_token
from tests.api.conftest import client_for
from tests.api.test_api_endpoints import free_port


def _db_text(edge) -> str:
    conn = sqlite3.connect(Path(edge.ready["data_dir"]) / "burrow.db")
    try:
        return "\n".join(
            str(row)
            for t in ("credentials", "api_keys")
            for row in conn.execute(f"SELECT * FROM {t}")
        )
    finally:
        conn.close()


def test_credential_lifecycle_and_agent_use(edge, api, agents):
    cred = api.credentials.create(description="ci runner", metadata="m", acl=["bind:*.burrow.localhost"])
    assert cred.id.startswith("cr_") and cred.token
    assert (cred.description, cred.metadata, cred.acl) == ("ci runner", "m", ["bind:*.burrow.localhost"])
    assert cred.owner_id.startswith("acct_")
    # the token is shown once and stored only as a hash
    assert api.credentials.get(cred.id).token is None
    assert all(c.token is None for c in api.credentials.list())
    db = _db_text(edge)
    assert cred.token not in db and hash_token(cred.token) in db
    # an agent can connect with it (binding a name its ACL allows), and its session points at it
    a = agents("http", free_port(), "--authtoken", cred.token)
    assert api.tunnel_sessions.get(a.ready["session_id"]).credential.id == cred.id
    a.stop()

    upd = api.credentials.update(cred.id, description="renamed", acl=[])
    assert upd.description == "renamed" and upd.acl == [] and upd.metadata == "m"
    ids = [c.id for c in api.credentials.list()]
    assert ids[0] == cred.id and len(ids) == 2  # newest first; the edge's own one after it
    api.credentials.delete(cred.id)
    with pytest.raises(ngrok.NotFoundError):
        api.credentials.get(cred.id)
    bad = agents("http", free_port(), "--authtoken", cred.token, check=False)
    assert bad.wait_exit(20) != 0


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"acl": ["connect:foo"]}, "ERR_NGROK_215"),
        ({"acl": ["bind:"]}, "ERR_NGROK_215"),
        ({"description": "d" * 256}, "ERR_NGROK_215"),
        ({"metadata": "m" * 4097}, "ERR_NGROK_215"),
        ({"owner_id": "usr_someoneelse"}, "ERR_NGROK_215"),
    ],
)
def test_credential_validation(api, kwargs, code):
    with pytest.raises(ngrok.Error) as exc:
        api.credentials.create(**kwargs)
    assert exc.value.error_code == code


def test_api_key_lifecycle(edge, api):
    key = api.api_keys.create(description="console", metadata="x")
    assert key.id.startswith("ak_") and key.token and key.owner_id.startswith("acct_")
    assert api.api_keys.get(key.id).token is None
    assert key.token not in _db_text(edge)
    fresh = client_for(edge, key.token)
    assert next(k.id for k in fresh.api_keys.list()) == key.id
    assert fresh.api_keys.update(key.id, description="tui").description == "tui"
    api.api_keys.delete(key.id)
    with pytest.raises(ngrok.Error) as exc:
        fresh.api_keys.list()
    assert exc.value.error_code == "ERR_NGROK_202" and exc.value.http_status_code == 401


def test_an_authtoken_is_not_an_api_key(edge, api):
    cred = api.credentials.create()
    with pytest.raises(ngrok.Error) as exc:
        client_for(edge, cred.token).endpoints.list()
    assert exc.value.error_code == "ERR_NGROK_206"


def test_paging_over_keys(api):
    made = [api.api_keys.create(description=str(i)).id for i in range(4)]
    page = api.api_keys.list(limit="2")
    assert [k.id for k in page.keys] == made[::-1][:2]
    assert [k.id for k in page][:4] == made[::-1]
