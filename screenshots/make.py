"""Make the README's screenshots from the same fixed data as the snapshot tests.

    .venv/bin/python screenshots/make.py

Writes one SVG per view into this folder.  The data (tests/console/fixture_api.py) is
served over real HTTP and the console is the real one, so these are what a user sees.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from textual._doc import take_svg_screenshot  # noqa: E402

from tests.console.fixture_api import FixtureServer  # noqa: E402
from tests.console.test_snapshots import fixture_app, settle  # noqa: E402

VIEWS = {
    "requests": (),
    "detail": ("j", "enter"),
    "tunnels": ("3",),
    "endpoints": ("1",),
    "ingresses": ("2",),
    "help": ("question_mark",),
    "edit-and-replay": ("j", "e"),
    "diff": ("j", "j", "D"),
    "new-cloud-endpoint": ("1", "n"),
}


def main() -> None:
    out = Path(__file__).resolve().parent
    with FixtureServer() as server:
        for name, keys in VIEWS.items():
            app = fixture_app(server.url)

            async def before(pilot, keys=keys):
                await settle(pilot)
                for k in keys:
                    await pilot.press(k)
                    await asyncio.sleep(0.1)
                await pilot.pause()

            svg = take_svg_screenshot(app=app, terminal_size=(120, 36), run_before=before)
            (out / f"{name}.svg").write_text(svg)
            print(f"wrote screenshots/{name}.svg")


if __name__ == "__main__":
    main()
