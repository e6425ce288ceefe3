"""The HA pieces of the agent ⇄ edge protocol, on single edges (no PostgreSQL).

AuthOk's ``direct_addr`` and ``edges``, the session ``slot`` and per-slot replacement,
and an agent holding several sessions (``--ha-connections``) that serve one tunnel.  A
real cluster (edges sharing PostgreSQL) is in the failover tests.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import httpx
import pytest

from backend import protocol as p
from tests.procs import BurrowProc, host_of, start_agent, start_edge
from tests.upstreams import HTTPUpstream

API_HEADERS = {"Authorization": "Bearer test-api-key", "Ngrok-Version": "2"}


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    proc = start_edge(tmp_path_factory.mktemp("edge"))
    yield proc
    proc.stop()


async def _control(edge: BurrowProc, client_id: str, slot: int = 0, raw_auth: bytes | None = None):
    host, port = edge.ready["ingress_addr"].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=edge.ready["ca_file"])
    r, w = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host)
    if raw_auth is not None:
        w.write(len(raw_auth).to_bytes(4, "big") + raw_auth)
    else:
        p.write_msg(w, p.Auth(authtoken="test-authtoken", client_id=client_id, slot=slot))
    ok = await asyncio.wait_for(p.read_msg(r), 10)
    assert isinstance(ok, p.AuthOk), ok
    return r, w, ok


async def _closed(r: asyncio.StreamReader, timeout: float = 10) -> bool:
    """Whether the edge ends this control connection (pings are answered by no one)."""
    try:
        while True:
            msg = await asyncio.wait_for(p.read_msg(r), timeout)
            if isinstance(msg, p.Stop | p.Restart):
                continue
    except (asyncio.IncompleteReadError, ConnectionError):
        return True
    except TimeoutError:
        return False


async def test_a_single_edge_sends_no_placement_and_old_agents_still_connect(edge):
    # an Auth from an agent that knows nothing of slots
    old = b'{"type":"auth","authtoken":"test-authtoken","client_id":"old-agent","protocol":1}'
    _r, w, ok = await _control(edge, "", raw_auth=old)
    try:
        # a single edge not told its address: data connections go where the agent dialled
        assert ok.direct_addr is None and ok.edges == []
    finally:
        w.close()
    # and an agent that knows nothing of direct_addr/edges reads a new AuthOk
    new = p.AuthOk(session_id="ts_1", session_key="k", account_id="a", direct_addr="10.0.0.2:4042",
                   edges=["10.0.0.2:4042", "10.0.0.3:4042"])
    body = p.encode(new)[4:]
    assert b'"direct_addr":"10.0.0.2:4042"' in body
    assert p.decode(body) == new
    assert p.decode(b'{"type":"auth_ok","session_id":"s","session_key":"k","account_id":"a"}').edges == []


async def test_a_new_session_replaces_the_stale_one_of_its_own_slot_only(edge):
    r0, w0, ok0 = await _control(edge, "ha-agent", slot=0)
    r1, w1, ok1 = await _control(edge, "ha-agent", slot=1)
    try:
        async with httpx.AsyncClient(base_url=edge.ready["api_url"], headers=API_HEADERS, timeout=10) as api:
            ids = {s["id"] for s in (await api.get("/tunnel_sessions")).json()["tunnel_sessions"]}
            assert {ok0.session_id, ok1.session_id} <= ids  # two slots: both live
            # slot 1 again (the agent reconnecting it): replaces slot 1, not slot 0
            _r2, w2, ok2 = await _control(edge, "ha-agent", slot=1)
            try:
                assert await _closed(r1)
                assert not await _closed(r0, timeout=0.5)
                ids = {s["id"] for s in (await api.get("/tunnel_sessions")).json()["tunnel_sessions"]}
                assert ok0.session_id in ids and ok2.session_id in ids and ok1.session_id not in ids
            finally:
                w2.close()
    finally:
        w0.close()
        w1.close()


async def test_slots_out_of_range_are_refused():
    with pytest.raises(p.ProtocolError):
        p.decode(b'{"type":"auth","authtoken":"t","client_id":"c","slot":99}')
    with pytest.raises(p.ProtocolError):
        p.decode(b'{"type":"auth","authtoken":"t","client_id":"c","slot":-1}')


async def _agent_json(a: BurrowProc, path: str) -> dict:
    async with httpx.AsyncClient(base_url=f"http://{a.ready['web_addr']}", timeout=10) as c:
        return (await c.get(path)).json()


async def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


async def test_an_agent_with_two_sessions_serves_one_tunnel_through_a_restart(edge, tmp_path):
    """--ha-connections 2 on one edge (both sessions there: it lists no other edge).

    Without a cluster, two sessions on one URL need pooling; the agent API shows one
    tunnel and two legs; restarting one session from the API loses no request, and the
    other session is not replaced."""
    async with HTTPUpstream() as up, httpx.AsyncClient(
        base_url=edge.ready["api_url"], headers=API_HEADERS, timeout=10
    ) as api:
        a = start_agent(edge, "http", str(up.port), "--pooling-enabled", "--ha-connections", "2",
                        home=tmp_path / "home")
        try:
            async def two_legs():
                legs = (await _agent_json(a, "/api/status"))["session"]["legs"]
                return legs if len(legs) == 2 else None

            legs = await _wait(two_legs, 15, "two sessions online")
            assert sorted(leg["slot"] for leg in legs) == [0, 1]
            assert {leg["edge"] for leg in legs} == {edge.ready["ingress_addr"]}
            tunnels = (await _agent_json(a, "/api/tunnels"))["tunnels"]
            assert len(tunnels) == 1  # one tunnel, however many sessions serve it
            url = tunnels[0]["public_url"]
            eps = [e for e in (await api.get("/endpoints")).json()["endpoints"] if e["url"] == url]
            assert len(eps) == 2 and {e["tunnel_session"]["id"] for e in eps} == {leg["session_id"] for leg in legs}

            by_slot = {leg["slot"]: leg["session_id"] for leg in legs}
            host, port = edge.http_addr
            # (started at, status) of each request, each on a connection of its own: a
            # public connection keeps its session's data connection for its life
            results: list[tuple[float, int]] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                fresh = httpx.Limits(max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10, limits=fresh) as c:
                    while not stop.is_set() and len(results) < 2000:
                        t0 = time.monotonic()
                        try:
                            r = await c.get("/ha", headers={"Host": host_of(url)})
                            results.append((t0, r.status_code))
                        except httpx.HTTPError:
                            results.append((t0, 0))

            runner = asyncio.create_task(traffic())
            await asyncio.sleep(0.3)
            r = await api.post(f"/tunnel_sessions/{by_slot[1]}/restart", json={})
            assert r.status_code == 200, r.text
            restarted = time.monotonic()  # slot 1's session is out of the routes by now

            async def slot1_back():
                legs = (await _agent_json(a, "/api/status"))["session"]["legs"]
                now = {leg["slot"]: leg["session_id"] for leg in legs}
                return now if len(now) == 2 and now[1] != by_slot[1] else None

            now = await _wait(slot1_back, 15, "slot 1 back with a new session")

            async def enough_after():
                return sum(1 for t0, _ in results if t0 >= restarted) >= 10 or runner.done()

            await _wait(enough_after, 15, "ten requests after the restart")
            stop.set()
            await runner
            # a request in flight on the restarted session may be cut with it; every
            # request that started after the restart succeeds
            after = [status for t0, status in results if t0 >= restarted]
            assert len(after) >= 10 and set(after) == {200}, after
            assert now[0] == by_slot[0]  # slot 0's session was not replaced
            assert a.proc.poll() is None
        finally:
            a.stop()


async def test_ha_connections_must_be_a_small_positive_number(edge, tmp_path):
    a = start_agent(edge, "http", "8080", "--ha-connections", "0", home=tmp_path / "h", check=False)
    assert a.wait_exit(15) == 2
    assert "--ha-connections" in a.stderr


async def test_each_leg_prefers_an_edge_no_other_leg_holds():
    from backend.agent.agent import Agent, AgentConfig, Leg

    a = Agent(AgentConfig(server_addr="cluster.example:4042", inspect_db_size=-1, ha_connections=2))
    try:
        leg0 = a.legs[0]
        assert a._pick_edge(leg0, 0) == "cluster.example:4042"  # no edge listed yet
        a.edges = ["e1:4042", "e2:4042", "e3:4042"]
        leg0.edge, leg0.connected, leg0.writer = "e2:4042", True, object()
        leg1 = Leg(1)
        a.legs.append(leg1)
        # the edges slot 0 does not hold, then the configured name as a way back
        assert [a._pick_edge(leg1, k) for k in range(4)] == ["e1:4042", "e3:4042", "cluster.example:4042", "e1:4042"]
        # slot 1 lost e1: it tries e3 first, e1 last
        leg1.edge = "e1:4042"
        assert [a._pick_edge(leg1, k) for k in range(3)] == ["e3:4042", "e1:4042", "cluster.example:4042"]
        # every edge held by another slot: any edge rather than none
        a.edges = ["e2:4042"]
        assert [a._pick_edge(leg1, k) for k in range(2)] == ["e2:4042", "cluster.example:4042"]
    finally:
        await a.stop()
