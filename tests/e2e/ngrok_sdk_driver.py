"""Run ngrok's Python Agent SDK against a burrow edge (a subprocess of the tests).

Started with ``PYTHONPATH`` set to the SDK's own target directory only, because the SDK
(``pip install ngrok``) and the ``ngrok-api`` client share the import name ``ngrok``.
Prints one JSON line (``{"url": ...}`` or ``{"error": [...]}``), then serves until its
stdin closes, and closes the session on the way out.  ``BURROW_SDK_OPTIONS`` holds more
``forward()`` keyword arguments as JSON; ``{"bytes_from_file": PATH}`` passes a file's
bytes (for ``crt``, ``key``, ``mutual_tls_cas``).

    python ngrok_sdk_driver.py UPSTREAM AUTHTOKEN SERVER_ADDR CA_FILE [PROTO [DOMAIN]]

With ``BURROW_SDK_SESSION=1`` (http/https only) the driver builds the session itself
(``ngrok.SessionBuilder``) instead of calling ``ngrok.forward``: the session defines a
stop handler, which prints ``{"event": "stop_command"}`` and ends the session, and the
driver prints ``{"event": "listener_closed"}`` when its listener stops forwarding (the
edge stopped the tunnel).
"""

import asyncio
import json
import os
import sys
import threading

import ngrok


def main() -> int:
    upstream, authtoken, server_addr, ca_file = sys.argv[1:5]
    proto = sys.argv[5] if len(sys.argv) > 5 else "http"
    domain = sys.argv[6] if len(sys.argv) > 6 else ""
    if os.environ.get("BURROW_SDK_SESSION") == "1":
        rc = asyncio.run(run_session(upstream, authtoken, server_addr, ca_file, proto, domain))
        sys.stdout.flush()
        # the SDK's threads may call into Python while the interpreter finalizes (it
        # aborts with "PyGILState_Release ... finalizing" now and then): skip that
        os._exit(rc)
    opts = {"proto": proto}
    if proto in ("http", "https"):  # the SDK's http listener binds https unless told
        opts = {"proto": "http", "schemes": [proto.upper()]}
    if domain:
        opts["domain"] = domain
    for key, value in json.loads(os.environ.get("BURROW_SDK_OPTIONS") or "{}").items():
        if isinstance(value, dict) and set(value) == {"bytes_from_file"}:
            # options the SDK wants as bytearray (crt, key, mutual_tls_cas): {"bytes_from_file": path}
            with open(value["bytes_from_file"], "rb") as f:
                value = bytearray(f.read())
        opts[key] = value  # e.g. basic_auth, traffic_policy, proxy_proto
    try:
        listener = ngrok.forward(
            upstream, authtoken=authtoken, server_addr=server_addr, root_cas=ca_file, **opts
        )
    except Exception as exc:  # the SDK raises ValueError(message, text, code)
        print(json.dumps({"error": [str(a) for a in exc.args]}), flush=True)
        return 1
    print(json.dumps({"url": listener.url(), "id": listener.id()}), flush=True)
    sys.stdin.read()
    ngrok.disconnect()
    return 0


def say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


async def run_session(
    upstream: str, authtoken: str, server_addr: str, ca_file: str, proto: str, domain: str
) -> int:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_stop() -> None:  # called by the SDK, on its own thread
        say({"event": "stop_command"})
        loop.call_soon_threadsafe(stopped.set)

    try:
        with open(ca_file, "rb") as f:
            ca = bytearray(f.read())
        session = await (
            ngrok.SessionBuilder()
            .authtoken(authtoken)
            .server_addr(server_addr)
            .ca_cert(ca)
            .handle_stop_command(on_stop)
            .connect()
        )
        builder = session.http_endpoint().scheme(proto.upper())
        if domain:
            builder = builder.domain(domain)
        listener = await builder.listen()
    except Exception as exc:
        say({"error": [str(a) for a in exc.args]})
        return 1
    say({"url": listener.url(), "id": listener.id()})
    forwarding = asyncio.ensure_future(listener.forward(upstream))
    forwarding.add_done_callback(lambda _t: say({"event": "listener_closed", "id": listener.id()}))
    stdin_closed = asyncio.Event()

    def read_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    stop = asyncio.ensure_future(stopped.wait())
    await asyncio.wait([asyncio.ensure_future(stdin_closed.wait()), stop], return_when=asyncio.FIRST_COMPLETED)
    if stop.done():
        await asyncio.sleep(0.2)  # let the SDK send its answer to the Stop request
    await session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
