"""The console header says when the agent's --inspect-db file is not being written."""

from __future__ import annotations

import resource

import httpx
import pytest

from tests.console.test_pilot import make_app, until
from tests.procs import host_of
from tests.upstreams import HTTPUpstream


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
async def test_header_shows_a_failing_capture_db_and_its_recovery(edge, agents, tmp_path):
    async with HTTPUpstream() as up:
        agent = agents("http", up.port, "--inspect-db", str(tmp_path / "captures.db"))
        app = make_app(edge, agent)
        host, port = edge.http_addr
        async with (
            app.run_test(size=(160, 36)) as pilot,
            httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as c,
        ):
            def header() -> str:
                return str(app.query_one("#header").render())

            await until(pilot, lambda: app.agent is not None and "online" in header(), what="connect")
            assert "capture db" not in header()
            # every write past byte 1 now fails with EFBIG, as on a full disk
            resource.prlimit(agent.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
            try:
                for i in range(3):
                    assert (await c.get(f"/{i}", headers={"Host": host_of(agent.public_url)})).status_code == 200
                await until(pilot, lambda: "capture db failing" in header(), what="the failure in the header")
                # the first failed batch may hold fewer than 3 (it is written 100 ms after
                # its first capture); each retry reports the count again
                await until(pilot, lambda: "(3 unsaved)" in header(), what="3 unsaved in the header")
            finally:
                resource.prlimit(agent.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            await until(pilot, lambda: "capture db" not in header(), timeout=20, what="the header to clear")
    assert app.return_code in (None, 0)
