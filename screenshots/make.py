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
from tests.console.test_snapshots import EMPTY, fixture_app, settle  # noqa: E402

# name: (keys, terminal size, data served: "full" fixture or a fresh install)
VIEWS = {
    "requests": ((), (120, 36), "full"),
    "requests-split": (("j", "j", "j"), (200, 50), "full"),
    "first-screen": ((), (120, 36), "empty"),
    "detail": (("j", "enter"), (120, 36), "full"),
    "tunnels": (("3",), (120, 36), "full"),
    "endpoints": (("1",), (120, 36), "full"),
    "ingresses": (("2",), (120, 36), "full"),
    "help": (("question_mark",), (120, 36), "full"),
    "edit-and-replay": (("j", "e"), (120, 36), "full"),
    "diff": (("j", "j", "D"), (120, 36), "full"),
    "new-cloud-endpoint": (("1", "n"), (120, 36), "full"),
    "new-tunnel-80x24": (("3", "n"), (80, 24), "full"),
}
DATA = {"full": ({}, {}), "empty": (EMPTY, {"rows": 0, "tunnels": 0, "endpoints": 0, "ingresses": 0})}


def main() -> None:
    out = Path(__file__).resolve().parent
    for data in DATA:
        served, counts = DATA[data]
        with FixtureServer(**served) as server:
            for name, (keys, size, which) in VIEWS.items():
                if which != data:
                    continue
                app = fixture_app(server.url)

                async def before(pilot, keys=keys, counts=counts):
                    await settle(pilot, **counts)
                    for k in keys:
                        await pilot.press(k)
                        await asyncio.sleep(0.1)
                    await pilot.pause(0.3)

                svg = take_svg_screenshot(app=app, terminal_size=size, run_before=before)
                (out / f"{name}.svg").write_text(svg)
                print(f"wrote screenshots/{name}.svg")


if __name__ == "__main__":
    main()
