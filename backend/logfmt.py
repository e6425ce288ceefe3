"""logfmt log lines in ngrok's style (``t=... lvl=info msg="..." key=value``).

Tools that drive ngrok (pyngrok) wait for particular messages on the agent's log, e.g.
``msg="starting web service" obj=web addr=127.0.0.1:4040``; the agent writes them here.
Secrets never reach this module: callers pass only addresses, names and ids.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TextIO


def _quote(v: object) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\t\n'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def format_line(lvl: str, msg: str, **fields: object) -> str:
    t = datetime.now().astimezone().isoformat(timespec="milliseconds")
    parts = [f"t={t}", f"lvl={lvl}", f"msg={_quote(msg)}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class LogfmtWriter:
    def __init__(self, target: str) -> None:
        self._own = target not in ("stdout", "stderr")
        self._out: TextIO = (
            sys.stdout if target == "stdout" else sys.stderr if target == "stderr" else open(target, "a")  # noqa: SIM115
        )
        # The agent binds its tunnels before it reports the session up; "started tunnel"
        # lines wait for the session lines, in ngrok's order.
        self._session_up = False
        self._held: list[dict] = []

    def __call__(self, lvl: str, msg: str, **fields: object) -> None:
        self._out.write(format_line(lvl, msg, **fields) + "\n")
        self._out.flush()

    def event(self, ev: dict) -> None:
        """Turn an agent event into ngrok's log vocabulary."""
        name = ev.get("event")
        if name == "session":
            self("info", "client session established", obj="tunnels.session", id=ev.get("session_id"))
            self("info", "tunnel session started", obj="tunnels.session")
            self._session_up = True
            held, self._held = self._held, []
            for t in held:
                self.event(t)
        elif name == "tunnel_started":
            if not self._session_up:
                self._held.append(ev)
                return
            self("info", "started tunnel", obj="tunnels", name=ev.get("name"), addr=ev.get("addr"), url=ev.get("public_url"))
        elif name == "tunnel_stopped":
            self("info", "stopped tunnel", obj="tunnels", name=ev.get("name"))
        elif name == "disconnected":
            if self._session_up:
                self("warn", "session closed", obj="tunnels.session", err=ev.get("reason"))
            else:  # a dial or handshake that failed: ngrok logs these as errors
                self("eror", "failed to reconnect session", obj="tunnels.session", err=ev.get("reason"))
            self._session_up = False
        elif name == "reconnecting":
            self("info", "reconnecting", obj="tunnels.session", attempt=ev.get("attempt"), delay=ev.get("delay"))
        elif name in ("stopped", "restart"):
            self("info", f"session {name} by the edge", obj="tunnels.session", reason=ev.get("reason"))

    def close(self) -> None:
        if self._own:
            self._out.close()
