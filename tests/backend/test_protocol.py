"""Tests for backend.protocol: framing, the message union and refusal of bad frames."""

from __future__ import annotations

import asyncio
import socket
import struct
import typing

import pytest

from backend import protocol as p

# One instance of every message type, with non-default values wherever there is a field.
SAMPLES: list[p._Msg] = [
    p.Auth(
        authtoken="tok_123",
        client_id="c0ffee",
        version="0.1.0",
        os="linux",
        hostname="box",
        metadata="meta ✓",
        protocol=7,
    ),
    p.Bind(
        req_id=3,
        name="web",
        proto="https",
        url="https://app.burrow.localhost",
        binding="public",
        pooling_enabled=True,
        metadata="m",
        description="d",
        upstream_url="http://localhost:8080",
        traffic_policy="on_http_request: []",
    ),
    p.Unbind(req_id=4, endpoint_id="ep_1"),
    p.AuthOk(
        session_id="ts_1",
        session_key="k3y",
        account_id="acct_1",
        region="eu",
        heartbeat_interval=1.5,
        heartbeat_timeout=4.5,
    ),
    p.BindOk(req_id=3, endpoint_id="ep_1", name="web", url="https://app.burrow.localhost"),
    p.UnbindOk(req_id=4),
    p.Error(req_id=9, code="ERR_NGROK_334", msg="already online"),
    p.NeedData(count=5),
    p.Stop(reason="stopped by the API"),
    p.Restart(reason="restart requested"),
    p.Ping(id=11, sent=123.25),
    p.Pong(id=11, sent=123.25),
    p.DataHello(session_id="ts_1", key="k3y"),
    p.StartData(
        endpoint_id="ep_1",
        name="web",
        proto="http",
        url="http://app.burrow.localhost:4080",
        client_addr="127.0.0.1",
        client_port=50123,
    ),
    p.DataPooled(),
]


def _union_members() -> set[type]:
    union = typing.get_args(p.Message)[0]  # Annotated[Union[...], Field(...)]
    return set(typing.get_args(union))


def _reader_with(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=2 * p.MAX_FRAME)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == _union_members()
    assert len({m.type for m in SAMPLES}) == len(SAMPLES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_encode_decode_round_trip(msg: p._Msg) -> None:
    frame = p.encode(msg)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    back = p.decode(frame[4:])
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
async def test_read_msg_reads_what_write_msg_wrote(msg: p._Msg) -> None:
    a, b = await _stream_pair()
    try:
        p.write_msg(a[1], msg)
        p.write_msg(a[1], p.Ping(id=1))  # a second frame right behind it
        await a[1].drain()
        assert await asyncio.wait_for(p.read_msg(b[0]), 5) == msg
        assert await asyncio.wait_for(p.read_msg(b[0]), 5) == p.Ping(id=1)
    finally:
        a[1].close()
        b[1].close()


async def test_read_msg_handles_a_frame_split_into_single_bytes() -> None:
    frame = p.encode(SAMPLES[0])
    reader = asyncio.StreamReader(limit=2 * p.MAX_FRAME)

    async def feed() -> None:
        for i in range(len(frame)):
            reader.feed_data(frame[i : i + 1])
            await asyncio.sleep(0)

    feeder = asyncio.create_task(feed())
    assert await asyncio.wait_for(p.read_msg(reader), 5) == SAMPLES[0]
    await feeder


async def test_oversize_frame_refused_before_reading_its_body() -> None:
    # Only the 4-byte header of a 10 MB frame, and no EOF: a reader that tried to read
    # the body would wait forever; read_msg must refuse at once.
    reader = _reader_with(struct.pack(">I", 10 * 1024 * 1024), eof=False)
    with pytest.raises(p.ProtocolError, match="10485760 bytes exceeds"):
        await asyncio.wait_for(p.read_msg(reader), 1)


async def test_oversize_frame_leaves_following_bytes_unread() -> None:
    reader = _reader_with(struct.pack(">I", 10 * 1024 * 1024) + b"x" * 100, eof=False)
    with pytest.raises(p.ProtocolError):
        await asyncio.wait_for(p.read_msg(reader), 1)
    assert await asyncio.wait_for(reader.read(1000), 1) == b"x" * 100


async def test_frame_of_exactly_max_frame_is_accepted() -> None:
    base = len(p.Auth(authtoken="t", client_id="c").model_dump_json())
    big = p.Auth(authtoken="t", client_id="c", metadata="m" * (p.MAX_FRAME - base))
    frame = p.encode(big)
    assert len(frame) == 4 + p.MAX_FRAME
    assert await asyncio.wait_for(p.read_msg(_reader_with(frame)), 5) == big


async def test_frame_one_byte_over_max_is_refused() -> None:
    header = struct.pack(">I", p.MAX_FRAME + 1)
    with pytest.raises(p.ProtocolError, match="exceeds"):
        await asyncio.wait_for(p.read_msg(_reader_with(header + b"{" * 16, eof=False)), 1)


def test_encode_refuses_an_oversize_message() -> None:
    base = len(p.Auth(authtoken="t", client_id="c").model_dump_json())
    over = p.Auth(authtoken="t", client_id="c", metadata="m" * (p.MAX_FRAME - base + 1))
    with pytest.raises(p.ProtocolError, match=f"exceeds the {p.MAX_FRAME}-byte limit"):
        p.encode(over)


async def test_write_msg_refuses_an_oversize_message_and_writes_nothing() -> None:
    a, b = await _stream_pair()
    try:
        with pytest.raises(p.ProtocolError):
            p.write_msg(a[1], p.Error(code="X", msg="y" * (p.MAX_FRAME + 1)))
        p.write_msg(a[1], p.Ping(id=2))
        await a[1].drain()
        assert await asyncio.wait_for(p.read_msg(b[0]), 5) == p.Ping(id=2)
    finally:
        a[1].close()
        b[1].close()


@pytest.mark.parametrize(
    "body, words",
    [
        (b"not json", ["Invalid JSON"]),
        (b"\xff\xfe\x00", ["Invalid JSON"]),
        (b'{"type": "ping", "id": 1} trailing', ["Invalid JSON"]),
        (b"[" * 5000, ["Invalid JSON"]),
        (b'{"type": "bogus"}', ["'bogus'", "does not match"]),
        (b'{"id": 1}', ["discriminator 'type'"]),
        (b"[1, 2]", ["object"]),
        (b'{"type": "auth", "client_id": "c"}', ["auth.authtoken", "Field required"]),
        (b'{"type": "data", "session_id": "ts_1"}', ["data.key", "Field required"]),
        (
            b'{"type": "bind", "req_id": "x", "name": "n", "proto": "http"}',
            ["bind.req_id", "integer"],
        ),
        (b'{"type": "bind", "req_id": 1, "name": "n", "proto": "ftp"}', ["bind.proto"]),
    ],
    ids=[
        "not-json",
        "binary",
        "trailing",
        "deep-nesting",
        "unknown-type",
        "no-type",
        "not-object",
        "auth-missing-token",
        "data-missing-key",
        "bind-bad-int",
        "bind-bad-proto",
    ],
)
def test_decode_errors_are_protocol_errors_with_readable_messages(
    body: bytes, words: list[str]
) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode(body)
    text = str(info.value)
    assert text.startswith("invalid message (")
    assert "\n" not in text
    assert "errors.pydantic.dev" not in text
    for w in words:
        assert w in text, text
    # The pydantic error is not chained in: the message is the whole story.
    assert info.value.__cause__ is None


async def test_read_msg_raises_protocol_error_for_a_bad_body() -> None:
    body = b'{"type": "auth"}'
    reader = _reader_with(struct.pack(">I", len(body)) + body)
    with pytest.raises(p.ProtocolError, match=r"auth\.authtoken"):
        await asyncio.wait_for(p.read_msg(reader), 1)


async def test_read_msg_eof_errors_pass_through() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(p.read_msg(_reader_with(b"\x00\x00")), 1)
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(p.read_msg(_reader_with(b"\x00\x00\x00\x10{}")), 1)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    msg = p.decode(b'{"type": "ping", "id": 5, "future_field": [1, 2]}')
    assert msg == p.Ping(id=5)


async def _stream_pair():
    s1, s2 = socket.socketpair()
    a = await asyncio.open_connection(sock=s1, limit=2 * p.MAX_FRAME)
    b = await asyncio.open_connection(sock=s2, limit=2 * p.MAX_FRAME)
    return a, b
