"""Form errors wrap inside their dialog instead of being cut at its edge."""

from __future__ import annotations

from pathlib import Path

from textual.app import App

import console.app
from console.manage import EndpointForm
from console.request_actions import EditReplayScreen
from console.screens import NewTunnelScreen

LONG = (
    "policy: on_http_request[0].expressions[0]: invalid CEL expression: "
    "undeclared reference to 'reqq' (in container '') at 1:1 — the rest of this message must stay visible END"
)


class _Host(App):
    CSS_PATH = str(Path(console.app.__file__).with_name("app.tcss"))


async def _check(screen, error_id: str) -> None:
    app = _Host()
    async with app.run_test(size=(80, 30)) as pilot:
        app.push_screen(screen)
        await pilot.pause()
        screen.show_error(LONG)
        await pilot.pause()
        label = screen.query_one(error_id)
        parent = label.parent
        assert label.region.right <= parent.content_region.right, (label.region, parent.content_region)
        assert label.size.height >= 2
        lines = [s.text for s in label.render_lines(label.region.reset_offset)]
        assert "END" in "".join(lines)


async def test_new_tunnel_error_wraps():
    await _check(NewTunnelScreen(), "#nt-error")


async def test_endpoint_form_error_wraps():
    await _check(EndpointForm(None), "#ef-error")


async def test_edit_replay_error_wraps():
    await _check(EditReplayScreen({"request": {"method": "GET", "uri": "/"}}), "#er-error")
