"""The edge's cloud API (ngrok API v2 wire format).

This module holds the API's conventions: Bearer API keys, the ``Ngrok-Version: 2``
header and ngrok's error body.  Resources are registered on :data:`router`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.httpserver import APIServer, Request, Response, Router, json_response
from backend.ids import new_id

if TYPE_CHECKING:
    from backend.edge.server import Edge


def api_error(req: Request | None, status: int, msg: str, code: str | None = None) -> Response:
    codes = {400: "ERR_NGROK_400", 404: "ERR_NGROK_404", 405: "ERR_NGROK_405", 413: "ERR_NGROK_213", 500: "ERR_NGROK_500"}
    return json_response(
        {
            "error_code": code or codes.get(status, f"ERR_NGROK_{status}"),
            "status_code": status,
            "msg": msg,
            "details": {"operation_id": new_id("op")},
        },
        status,
    )


def _check(edge: Edge):
    def before(req: Request) -> Response | None:
        auth = req.headers.get("authorization")
        if auth is None:
            return api_error(req, 401, "Missing authorization header.", "ERR_NGROK_200")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return api_error(req, 401, "The authorization header could not be parsed.", "ERR_NGROK_201")
        assert edge.store is not None
        token = token.strip()
        if edge.store.find_api_key(token) is None:
            if edge.store.find_authtoken(token) is not None:
                return api_error(
                    req, 401, "You used an authtoken where an API key is required.", "ERR_NGROK_206"
                )
            return api_error(req, 401, "The API key is invalid.", "ERR_NGROK_202")
        version = req.headers.get("ngrok-version")
        if version is None:
            return api_error(req, 400, "Missing the Ngrok-Version header.", "ERR_NGROK_218")
        if version.strip() != "2":
            return api_error(req, 400, f"Unsupported API version {version!r}.", "ERR_NGROK_217")
        return None

    return before


async def start_api(edge: Edge, addr: str):
    router = Router()

    async def root(req: Request) -> Response:
        return json_response({"uri": req.base_url + "/"})

    router.add("GET", "/", root)
    server = APIServer(router, api_error, before=_check(edge))
    bound = await server.start(addr)
    return server, bound
