"""Managing the cloud from the keyboard: endpoint and ingress forms, deletes, tunnel sessions.

Pilot tests drive a real edge (and agent) started by the fixtures and check the result
through the cloud API itself; snapshot tests pin the forms and the sessions screen on
the fixed data of ``fixture_api``.
"""

from __future__ import annotations

import httpx
import pytest
from textual.widgets import Input, Label, Select, TextArea

from console.app import BurrowApp
from console.config import Settings
from console.manage import AGENT_READ_ONLY, EndpointForm, IngressForm, SessionsScreen
from console.panes import EndpointsPane, IngressesPane
from console.screens import ConfirmScreen
from tests.console.fixture_api import FixtureServer
from tests.console.test_pilot import public, until
from tests.console.test_snapshots import SIZES, fixture_app, settle

API_KEY = "test-api-key"


def cloud_app(edge, agent=None, **extra) -> BurrowApp:
    settings = Settings(
        agent_url=f"http://{agent.ready['web_addr']}" if agent else None,
        api_url=edge.ready["api_url"],
        api_key=API_KEY,
        context="test",
        **{"cloud_poll_seconds": 0.5, **extra},
    )

    async def starter(progress):
        return settings.agent_url, settings.api_url, settings.api_key

    return BurrowApp(settings, starter)


def api(edge) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=edge.ready["api_url"],
        headers={"Authorization": f"Bearer {API_KEY}", "Ngrok-Version": "2"},
        timeout=10,
    )


async def cloud_endpoints(a: httpx.AsyncClient) -> list[dict]:
    return [e for e in (await a.get("/endpoints")).json()["endpoints"] if e["type"] == "cloud"]


async def type_into(pilot, selector: str, text: str) -> None:
    box = pilot.app.screen.query_one(selector, Input)
    box.focus()
    box.value = ""
    await pilot.press(*text)


POLICY = """\
on_http_request:
  - actions:
      - type: custom-response
        config:
          status_code: 201
          body: made by the console
"""


async def test_endpoint_create_edit_invalid_policy_delete(edge):
    app = cloud_app(edge)
    async with app.run_test(size=(120, 36)) as pilot, api(edge) as a, public(edge) as c:
        await until(pilot, lambda: app.cloud is not None, what="cloud client")
        await pilot.press("1")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, EndpointForm), what="form")
        form = app.screen
        await type_into(pilot, "#ef-url", "http://made")
        form.query_one("#ef-description", Input).value = "from the console"
        form.query_one("#ef-policy", TextArea).text = POLICY
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, EndpointForm), what="form to close")
        [ep] = await cloud_endpoints(a)
        assert ep["url"].startswith("http://made.") and ep["description"] == "from the console"
        assert "made by the console" in ep["traffic_policy"]
        pane = app.query_one(EndpointsPane)
        await until(pilot, lambda: [r.get("id") for r in pane.shown] == [ep["id"]], what="pane row")
        r = await c.get("/", headers={"Host": ep["host"]})
        assert (r.status_code, r.text) == (201, "made by the console")

        # edit: the description and the binding stay, the policy changes
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EndpointForm) and app.screen.query("#ef-url"), what="edit form")
        form = app.screen
        assert form.query_one("#ef-url", Input).value == ep["url"]
        await type_into(pilot, "#ef-description", "edited")
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, EndpointForm), what="edit to close")
        [ep2] = await cloud_endpoints(a)
        assert ep2["id"] == ep["id"] and ep2["description"] == "edited"
        await until(pilot, lambda: pane.shown and pane.shown[0].get("description") == "edited", what="pane update")

        # an invalid policy: the API's message shows in the form, which stays open
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EndpointForm), what="edit form")
        form = app.screen
        form.query_one("#ef-policy", TextArea).text = "on_http_request:\n  - actions:\n      - type: no-such-action\n"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: form.error, what="inline error")
        expected = (
            await a.patch(f"/endpoints/{ep['id']}", json={"traffic_policy": form.query_one("#ef-policy", TextArea).text})
        ).json()["msg"]
        assert expected in form.error
        assert "no-such-action" in form.error
        assert app.screen is form and form.query_one("#ef-error", Label).display
        await pilot.press("escape")  # the policy was changed: asks first
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="discard changes?")
        await pilot.press("y")
        await until(pilot, lambda: not isinstance(app.screen, EndpointForm), what="cancel")
        [ep3] = await cloud_endpoints(a)
        assert ep3["traffic_policy"] == ep2["traffic_policy"]

        # delete, confirmed (cancel first)
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("n")
        await pilot.pause(0.2)
        assert len(await cloud_endpoints(a)) == 1
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: app.endpoints == [], what="pane to empty")
        assert await cloud_endpoints(a) == []
    assert app._exception is None


async def test_internal_url_infers_the_internal_binding(edge):
    app = cloud_app(edge)
    async with app.run_test(size=(120, 36)) as pilot, api(edge) as a:
        await until(pilot, lambda: app.cloud is not None, what="cloud client")
        await pilot.press("1", "n")
        await until(pilot, lambda: isinstance(app.screen, EndpointForm), what="form")
        await type_into(pilot, "#ef-url", "https://api.internal")
        assert app.screen.query_one("#ef-binding", Select).value == "internal"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, EndpointForm), what="form to close")
        [ep] = await cloud_endpoints(a)
        assert ep["bindings"] == ["internal"]


async def test_ingress_create_edit_delete(edge):
    app = cloud_app(edge)
    async with app.run_test(size=(120, 36)) as pilot, api(edge) as a:
        await until(pilot, lambda: app.cloud is not None, what="cloud client")
        await pilot.press("2")
        # an error from the API (a domain this edge controls) keeps the form open
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, IngressForm), what="form")
        form = app.screen
        await type_into(pilot, "#if-domain", "x.burrow.localhost")
        await pilot.press("enter")
        await until(pilot, lambda: form.error, what="inline error")
        assert "third party domain" in form.error and app.screen is form

        await type_into(pilot, "#if-domain", "connect.example.com")
        form.query_one("#if-description", Input).value = "office"
        form.query_one("#if-cert", Select).value = "letsencrypt:ecdsa"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, IngressForm), what="form to close")
        [ing] = (await a.get("/agent_ingresses")).json()["ingresses"]
        assert ing["domain"] == "connect.example.com" and ing["description"] == "office"
        assert ing["certificate_management_policy"] == {"authority": "letsencrypt", "private_key_type": "ecdsa"}
        pane = app.query_one(IngressesPane)
        await until(pilot, lambda: [r.get("id") for r in pane.shown] == [ing["id"]], what="pane row")

        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, IngressForm), what="edit form")
        form = app.screen
        assert not form.query("#if-domain")  # the domain is fixed once registered
        assert form.query_one("#if-cert", Select).value == "letsencrypt:ecdsa"
        await type_into(pilot, "#if-description", "edited")
        form.query_one("#if-cert", Select).value = "none"
        await pilot.press("ctrl+s")
        await until(pilot, lambda: not isinstance(app.screen, IngressForm), what="edit to close")
        [ing2] = (await a.get("/agent_ingresses")).json()["ingresses"]
        assert ing2["description"] == "edited" and not ing2.get("certificate_management_policy")
        await until(pilot, lambda: pane.shown and pane.shown[0].get("description") == "edited", what="pane update")

        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: app.ingresses == [], what="pane to empty")
        assert (await a.get("/agent_ingresses")).json()["ingresses"] == []
    assert app._exception is None


async def test_read_only_has_no_delete_and_no_session_commands(edge, agents):
    agent = agents("http", 9, "--name", "web")
    app = cloud_app(edge, agent, read_only=True)
    async with app.run_test(size=(120, 36)) as pilot, api(edge) as a:
        await until(pilot, lambda: len(app.endpoints) == 1, what="agent endpoint")
        for pane in (app.query_one(EndpointsPane), app.query_one(IngressesPane)):
            actions = {b.action for bs in pane._bindings.key_to_bindings.values() for b in bs}
            assert "delete_endpoint" not in actions and "delete_ingress" not in actions
            assert "ctrl+d" not in pane._bindings.key_to_bindings
        await pilot.press("1", "ctrl+d")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("S")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, what="sessions")
        assert not {"s", "r"} & set(app.screen._bindings.key_to_bindings)
        await pilot.press("s")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmScreen)
        assert len((await a.get("/tunnel_sessions")).json()["tunnel_sessions"]) == 1


async def test_agent_endpoints_are_read_only_and_sessions_stop(edge, agents):
    agent = agents("http", 9, "--name", "web")
    app = cloud_app(edge, agent)
    async with app.run_test(size=(120, 36)) as pilot, api(edge) as a:
        await until(pilot, lambda: len(app.endpoints) == 1, what="agent endpoint")
        await pilot.press("1", "e")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, EndpointForm)
        assert any(AGENT_READ_ONLY in str(n.message) for n in app._notifications)

        # delete asks, then shows the API's refusal for a burrow agent's endpoint
        await pilot.press("ctrl+d")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(
            pilot,
            lambda: any("the agent that started it owns it" in str(n.message) for n in app._notifications),
            what="the API's refusal",
        )
        assert len((await a.get("/endpoints")).json()["endpoints"]) == 1

        await pilot.press("S")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen) and app.screen.loaded, what="sessions")
        screen = app.screen
        [s] = (await a.get("/tunnel_sessions")).json()["tunnel_sessions"]
        assert [x["id"] for x in screen.sessions] == [s["id"]]
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="confirm")
        await pilot.press("y")
        await until(pilot, lambda: agent.proc.poll() is not None, timeout=15, what="the agent to exit")
        await until(pilot, lambda: screen.sessions == [], what="sessions to empty")
        assert (await a.get("/tunnel_sessions")).json()["tunnel_sessions"] == []
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, SessionsScreen), what="back")
    assert app._exception is None


# ---------------------------------------------------------------- snapshots
@pytest.fixture(scope="module")
def fixture_url():
    with FixtureServer() as server:
        yield server.url


def _snap(snap_compare, url, size, *keys, ready=None):
    app = fixture_app(url)

    async def before(pilot):
        await settle(pilot)
        for k in keys:
            await pilot.press(k)
            await pilot.pause(0.1)
        if ready is not None:
            await until(pilot, lambda: ready(pilot.app), what="screen ready")
        for box in pilot.app.screen.query(Input):
            box.cursor_blink = False
        for area in pilot.app.screen.query(TextArea):
            area.cursor_blink = False
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=before)
    assert app._exception is None


@pytest.mark.parametrize("size", SIZES)
def test_endpoint_form(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "1", "n")


@pytest.mark.parametrize("size", SIZES)
def test_ingress_form(snap_compare, fixture_url, size):
    _snap(snap_compare, fixture_url, size, "2", "e")


@pytest.mark.parametrize("size", SIZES)
def test_sessions_screen(snap_compare, fixture_url, size):
    _snap(
        snap_compare, fixture_url, size, "1", "S",
        ready=lambda app: isinstance(app.screen, SessionsScreen) and app.screen.loaded,
    )
