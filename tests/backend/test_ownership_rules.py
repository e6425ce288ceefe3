"""backend.ownership's sharing rule in memory (single edge): one account per name; in it,
holders share when all pool or when they are one agent (same client id)."""

from __future__ import annotations

import pytest

from backend.ownership import Holder, NameConflict, Ownership


async def test_one_agents_two_sessions_share_a_url_others_must_pool():
    own = Ownership()
    await own.claim("host:a.example.com", Holder("ep_1", "acct_a", "https", False, "agent", "cli-1"))
    # the same agent (an HA agent's second session): shares without pooling
    await own.claim("host:a.example.com", Holder("ep_2", "acct_a", "https", False, "agent", "cli-1"))
    with pytest.raises(NameConflict) as exc:  # another agent of the account must pool
        await own.claim("host:a.example.com", Holder("ep_3", "acct_a", "https", True, "agent", "cli-2"))
    assert exc.value.reason == "pooling_disabled"
    with pytest.raises(NameConflict) as exc:
        await own.claim("host:a.example.com", Holder("ep_4", "acct_b", "https", True, "agent", "cli-1"))
    assert exc.value.reason == "other_account"
    own.release("ep_1")
    own.release("ep_2")
    assert await own.owner_of("host:a.example.com") is None
    await own.claim("host:a.example.com", Holder("ep_4", "acct_b", "https", False, "agent", "cli-9"))
    assert await own.owner_of("host:a.example.com") == "acct_b"


async def test_no_client_id_never_counts_as_the_same_agent():
    own = Ownership()
    await own.claim("tcp:31000", Holder("ep_c", "acct_a", "tcp", False, "cloud"))
    with pytest.raises(NameConflict) as exc:
        await own.claim("tcp:31000", Holder("ep_d", "acct_a", "tcp", False, "cloud"))
    assert exc.value.reason == "online"


async def test_a_holder_of_another_account_that_came_in_meanwhile_is_another_account():
    # (a cluster's change feed may put another account's cloud endpoint in memory while
    # a claim waits for the store: the claim must say "another account", not "pool")
    from backend.ownership import check_sharing

    mine = Holder("ep_b", "acct_b", "https", False, "cloud")
    theirs = Holder("ep_a", "acct_a", "https", False, "cloud")
    with pytest.raises(NameConflict) as exc:
        check_sharing("host:x.example.com", mine, [theirs])
    assert exc.value.reason == "other_account"
