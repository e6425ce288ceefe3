"""/tunnel_sessions: live agent sessions, and stop / restart / update acting on the agent."""

from __future__ import annotations

import platform
import socket
import threading
import time

import ngrok
import pytest

from tests.api.conftest import wait_until
from tests.api.test_api_endpoints import free_port


def test_list_and_get_describe_the_live_session(api, agents):
    a = agents("http", free_port())
    sid = a.ready["session_id"]
    sessions = list(api.tunnel_sessions.list())
    assert [s.id for s in sessions] == [sid]
    s = api.tunnel_sessions.get(sid)
    assert s.id == sid and s.uri.endswith(f"/tunnel_sessions/{sid}")
    assert s.agent_version and s.os == platform.system().lower()
    assert s.ip == "127.0.0.1" and s.region == "local" and s.transport
    assert s.started_at.endswith("Z")
    assert s.credential.id.startswith("cr_")
    assert api.credentials.get(s.credential.id).id == s.credential.id
    assert s.metadata is None


def test_paging_over_sessions(api, agents):
    ids = [agents("http", free_port()).ready["session_id"] for _ in range(3)]
    page = api.tunnel_sessions.list(limit="2")
    assert len(page.tunnel_sessions) == 2 and page.next_page_uri
    assert [s.id for s in page] == sorted(ids, reverse=True)


def test_stop_ends_the_agent_and_its_endpoints(api, agents):
    a = agents("http", free_port())
    sid = a.ready["session_id"]
    assert any(e.tunnel_session and e.tunnel_session.id == sid for e in api.endpoints.list())
    api.tunnel_sessions.stop(sid)  # the client POSTs with no body and expects JSON back
    assert a.wait_exit(15) == 0
    assert [e for e in api.endpoints.list() if e.type == "agent"] == []
    with pytest.raises(ngrok.NotFoundError):
        api.tunnel_sessions.get(sid)
    with pytest.raises(ngrok.NotFoundError):
        api.tunnel_sessions.stop(sid)


def test_restart_makes_the_agent_reconnect_with_a_new_session(api, agents):
    a = agents("http", free_port(), "--url", "http://again.burrow.localhost")
    sid, url = a.ready["session_id"], a.public_url
    api.tunnel_sessions.restart(sid)
    ev = a.wait_event("session", 20)
    assert ev["session_id"] != sid
    assert a.proc.poll() is None
    sessions = wait_until(lambda: [s.id for s in api.tunnel_sessions.list()], what="new session")
    assert sessions == [ev["session_id"]]
    eps = wait_until(
        lambda: [e for e in api.endpoints.list() if e.url == url], what="re-bound endpoint"
    )
    assert eps[0].tunnel_session.id == ev["session_id"]


def test_restart_cuts_the_tcp_connections_of_the_old_session(api, agents, edge):
    """Connections carried by the old session end with it, also spliced TCP relays."""
    srv = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        c, _ = srv.accept()
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    threading.Thread(target=echo, daemon=True).start()
    a = agents("tcp", str(srv.getsockname()[1]))
    port = int(a.public_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"ping")
        assert c.recv(4) == b"ping"
        api.tunnel_sessions.restart(a.ready["session_id"])
        a.wait_event("session", 20)
        try:
            ended = c.recv(10) == b""
        except ConnectionResetError:
            ended = True
        assert ended  # (a timeout here means the relay outlived its session)
    srv.close()
    time.sleep(0.2)  # the edge's log lines for the cut relay, if any
    # the relay ends quietly (Python 3.11 logs "Exception in callback" with a
    # CancelledError traceback for a connection handler that ends cancelled)
    assert "Traceback" not in edge.stderr and "CancelledError" not in edge.stderr, edge.stderr[-3000:]


def test_update_is_accepted(api, agents, raw):
    a = agents("http", free_port())
    sid = a.ready["session_id"]
    api.tunnel_sessions.update(sid)
    assert a.proc.poll() is None and api.tunnel_sessions.get(sid).id == sid


@pytest.mark.parametrize("action", ["stop", "restart", "update"])
def test_actions_answer_json_without_body_or_content_type(raw, agents, action):
    sid = agents("http", free_port()).ready["session_id"]
    r = raw.post(f"/tunnel_sessions/{sid}/{action}")
    assert r.status_code == 200
    assert "content-type" not in r.request.headers and r.request.content == b""
    assert r.headers["content-type"] == "application/json" and r.json() == {}


def test_actions_refuse_parameters(raw, agents):
    sid = agents("http", free_port()).ready["session_id"]
    r = raw.post(f"/tunnel_sessions/{sid}/update", json={"force": True})
    assert r.status_code == 400 and r.json()["error_code"] == "ERR_NGROK_214"


def test_unknown_sessions(raw):
    for path in ("/tunnel_sessions/ts_" + "0" * 27, "/tunnel_sessions/ts_" + "0" * 27 + "/stop"):
        method = raw.post if path.endswith("stop") else raw.get
        r = method(path)
        assert r.status_code == 404 and r.json()["error_code"] == "ERR_NGROK_404"
    for odd in ("nope", "ts_unknown"):  # ngrok: 404 for any id it has nothing for
        r = raw.get(f"/tunnel_sessions/{odd}")
        assert r.status_code == 404 and r.json()["error_code"] == "ERR_NGROK_404"
