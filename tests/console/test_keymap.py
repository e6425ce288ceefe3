"""Every key in the keymap table names an action that exists where the key works."""

from __future__ import annotations

import re

import pytest

from console.app import BurrowApp
from console.keymap import KEYMAP, bindings
from console.manage import SessionsScreen
from console.panes import EndpointsPane, IngressesPane, RequestsPane, TablePane, TunnelsPane
from console.request_actions import DiffScreen
from console.screens import ConfirmScreen, DetailScreen
from console.widgets.request_list import RequestList

CONTEXTS = {
    "app": [BurrowApp],
    "list": [TablePane],
    "endpoints": [EndpointsPane],
    "ingresses": [IngressesPane],
    "tunnels": [TunnelsPane],
    "requests": [RequestsPane, RequestList],
    "detail": [DetailScreen],
    "diff": [DiffScreen],
    "confirm": [ConfirmScreen],
    "sessions": [SessionsScreen],
}


@pytest.mark.parametrize("key", KEYMAP, ids=[k.id for k in KEYMAP])
def test_every_binding_names_a_real_action(key):
    action = re.sub(r"\(.*\)$", "", key.action)
    owners = CONTEXTS[key.context]
    if action.startswith("app."):
        owners, action = [BurrowApp], action[4:]
    assert any(callable(getattr(cls, f"action_{action}", None)) for cls in owners), (
        f"{key.id}: no action_{action} on {[c.__name__ for c in owners]}"
    )


def test_ids_are_unique_and_contexts_known():
    ids = [k.id for k in KEYMAP]
    assert len(ids) == len(set(ids))
    assert {k.context for k in KEYMAP} <= set(CONTEXTS)


def test_read_only_drops_dangerous_keys_entirely():
    for ctx in CONTEXTS:
        ro = {b.action for b in bindings(ctx, read_only=True)}
        dangerous = {k.action for k in KEYMAP if k.context == ctx and k.dangerous}
        assert not (ro & dangerous)
    assert {"stop_tunnel", "clear", "delete_endpoint", "delete_ingress"} <= {
        k.action for k in KEYMAP if k.dangerous
    }
