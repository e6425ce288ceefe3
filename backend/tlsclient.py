"""The agent's TLS client context, kept apart from the CA code.

Importing ``cryptography`` (for the local CA) costs an agent ~9 MB of memory it never
uses; the agent only needs a verifying client context from the standard library.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(root_cas: str | Path | None = None) -> ssl.SSLContext:
    """Return a verifying TLS 1.2+ client context.

    With ``root_cas`` (a PEM file) only those CAs are trusted, e.g. burrow's ``ca.pem``;
    with ``None`` the system's default trust store is used.
    """
    cafile = str(root_cas) if root_cas is not None else None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
