"""Run ngrok's Python Agent SDK against a burrow edge (a subprocess of the tests).

Started with ``PYTHONPATH`` set to the SDK's own target directory only, because the SDK
(``pip install ngrok``) and the ``ngrok-api`` client share the import name ``ngrok``.
Prints one JSON line (``{"url": ...}`` or ``{"error": [...]}``), then serves until its
stdin closes, and closes the session on the way out.  ``BURROW_SDK_OPTIONS`` holds more
``forward()`` keyword arguments as JSON; ``{"bytes_from_file": PATH}`` passes a file's
bytes (for ``crt``, ``key``, ``mutual_tls_cas``).

    python ngrok_sdk_driver.py UPSTREAM AUTHTOKEN SERVER_ADDR CA_FILE [PROTO [DOMAIN]]
"""

import json
import os
import sys

import ngrok


def main() -> int:
    upstream, authtoken, server_addr, ca_file = sys.argv[1:5]
    proto = sys.argv[5] if len(sys.argv) > 5 else "http"
    domain = sys.argv[6] if len(sys.argv) > 6 else ""
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


if __name__ == "__main__":
    sys.exit(main())
