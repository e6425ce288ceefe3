"""Compare a replay with its original: request line, status, headers and bodies.

No tunnel inspector shows what changed between a request and its replay; this does,
for both sides of the exchange.  Bodies are compared after undoing chunked framing and
gzip (so the transfer format is not mistaken for a change), JSON is compared
pretty-printed with sorted keys (so key order and spacing are not either), and binary
bodies are compared by size and SHA-256 only.  Large bodies are cut to
:data:`DIFF_LIMIT` per side, and the cut is reported.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from console.render import (
    BodyInfo,
    _decode_text,
    _escape_controls,
    _is_binary_type,
    _kind,
    decode_body,
    human_size,
    plural,
)

__all__ = [
    "CONTEXT_LINES",
    "DIFF_LIMIT",
    "RENDER_LINES",
    "BodyDiff",
    "CaptureDiff",
    "Change",
    "HeaderChange",
    "HeaderDiff",
    "SideDiff",
    "diff_captures",
    "render_side_by_side",
    "render_unified",
]

DIFF_LIMIT = 200 * 1024
"""Most characters of each side's (normalised) body that are diffed."""
CONTEXT_LINES = 3
"""Unchanged lines shown around each change."""
RENDER_LINES = 2_000
"""Most body diff lines rendered (a Rich table of thousands of rows is slow to lay out)."""

_OLD = "red"
_NEW = "green"
_SAME = "dim"
_HUNK = "cyan"
_NOTE = "yellow"
_TITLE = "bold"

T = TypeVar("T")
Opcode = tuple[str, int, int, int, int]
BodyKind = Literal["empty", "text", "json", "binary"]


@dataclass(frozen=True)
class Change(Generic[T]):
    """A value in the original and in the replay."""

    old: T
    new: T

    @property
    def changed(self) -> bool:
        return self.old != self.new


@dataclass(frozen=True)
class HeaderChange:
    """One header name whose values differ; ``old`` or ``new`` is empty when absent."""

    name: str
    old: tuple[str, ...]
    new: tuple[str, ...]

    @property
    def kind(self) -> Literal["added", "removed", "changed"]:
        if not self.old:
            return "added"
        if not self.new:
            return "removed"
        return "changed"


@dataclass
class HeaderDiff:
    """Header differences, names compared case-insensitively, values in order."""

    changes: list[HeaderChange] = field(default_factory=list)
    """In the original's header order, then headers only the replay has."""
    unchanged: int = 0
    """Number of header names with the same values on both sides."""

    @property
    def added(self) -> list[HeaderChange]:
        return [c for c in self.changes if c.kind == "added"]

    @property
    def removed(self) -> list[HeaderChange]:
        return [c for c in self.changes if c.kind == "removed"]

    @property
    def changed(self) -> list[HeaderChange]:
        return [c for c in self.changes if c.kind == "changed"]

    def get(self, name: str) -> HeaderChange | None:
        """The change for header ``name`` (case-insensitive), if it differs."""
        wanted = name.lower()
        return next((c for c in self.changes if c.name.lower() == wanted), None)


@dataclass
class BodyDiff:
    """How one side's bodies differ.

    ``kind`` is ``json`` when both bodies parsed and were normalised, ``binary`` when
    either is not text (then only sizes and hashes are compared), ``empty`` when
    neither has a body, else ``text``.
    """

    kind: BodyKind = "empty"
    same: bool = True
    old_size: int = 0
    new_size: int = 0
    """Decoded (de-chunked, decompressed) sizes in bytes."""
    old_sha256: str = ""
    new_sha256: str = ""
    old_lines: list[str] = field(default_factory=list)
    new_lines: list[str] = field(default_factory=list)
    """The (normalised, capped) text compared, split into lines; empty for binary."""
    hunks: list[list[Opcode]] = field(default_factory=list)
    """difflib grouped opcodes over the lines, :data:`CONTEXT_LINES` of context."""
    notes: list[str] = field(default_factory=list)

    def unified(self, old_label: str = "original", new_label: str = "replay") -> list[str]:
        """The diff as unified-diff lines (``---``/``+++`` header, ``@@`` hunks)."""
        if not self.hunks:
            return []
        out = [f"--- {old_label}", f"+++ {new_label}"]
        for hunk in self.hunks:
            i1, i2, j1, j2 = hunk[0][1], hunk[-1][2], hunk[0][3], hunk[-1][4]
            out.append(f"@@ -{_range(i1, i2)} +{_range(j1, j2)} @@")
            for tag, a1, a2, b1, b2 in hunk:
                if tag == "equal":
                    out.extend(" " + line for line in self.old_lines[a1:a2])
                    continue
                out.extend("-" + line for line in self.old_lines[a1:a2])
                out.extend("+" + line for line in self.new_lines[b1:b2])
        return out


@dataclass
class SideDiff:
    """Headers and body of one side (request or response)."""

    headers: HeaderDiff = field(default_factory=HeaderDiff)
    body: BodyDiff = field(default_factory=BodyDiff)

    @property
    def changed(self) -> bool:
        return bool(self.headers.changes) or not self.body.same


@dataclass
class CaptureDiff:
    """Everything that differs between an original capture and its replay."""

    original_id: str
    replay_id: str
    method: Change[str]
    uri: Change[str]
    status: Change[int | None]
    """Status codes; ``None`` on a side with no response (yet)."""
    status_text: Change[str]
    """Full status strings such as ``200 OK``."""
    request: SideDiff
    response: SideDiff

    @property
    def changed(self) -> bool:
        return (
            self.method.changed
            or self.uri.changed
            or self.status.changed
            or self.request.changed
            or self.response.changed
        )

    def summary(self) -> str:
        """One line saying what changed, for a status bar or a title."""
        parts: list[str] = []
        if self.method.changed or self.uri.changed:
            parts.append("request line")
        if self.status.changed:
            parts.append(f"status {self.status.old or '—'} → {self.status.new or '—'}")
        for side, diff in (("request", self.request), ("response", self.response)):
            n = len(diff.headers.changes)
            if n:
                parts.append(plural(n, f"{side} header"))
            if not diff.body.same:
                parts.append(f"{side} body")
        return "differs: " + ", ".join(parts) if parts else "no differences"


def _range(start: int, stop: int) -> str:
    """A unified-diff hunk range (``start,length``, 1-based; ``start-1,0`` when empty)."""
    length = stop - start
    if length == 0:
        return f"{start},0"
    return f"{start + 1}" if length == 1 else f"{start + 1},{length}"


# --- comparing -------------------------------------------------------------------------


def _raw(half: Mapping[str, Any] | None) -> bytes:
    if not half or not isinstance(half.get("raw"), str):
        return b""
    try:
        return base64.b64decode(half["raw"])
    except (binascii.Error, ValueError):
        return b""


def _headers(info: BodyInfo, half: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Ordered headers from the raw bytes, else from the API's ``{name: [values]}``."""
    if info.headers:
        return info.headers
    out: list[tuple[str, str]] = []
    for name, values in ((half or {}).get("headers") or {}).items():
        out.extend((str(name), str(v)) for v in (values if isinstance(values, list) else [values]))
    return out


def diff_headers(old: list[tuple[str, str]], new: list[tuple[str, str]]) -> HeaderDiff:
    """Compare header lists by lower-cased name; a name's values are compared in order."""

    def grouped(headers: list[tuple[str, str]]) -> dict[str, tuple[str, list[str]]]:
        out: dict[str, tuple[str, list[str]]] = {}
        for name, value in headers:
            out.setdefault(name.lower(), (name, []))[1].append(value)
        return out

    a, b = grouped(old), grouped(new)
    result = HeaderDiff()
    for key, (name, values) in a.items():
        other = b.get(key, (name, []))[1]
        if values == other:
            result.unchanged += 1
        else:
            result.changes.append(HeaderChange(name, tuple(values), tuple(other)))
    for key, (name, values) in b.items():
        if key not in a:
            result.changes.append(HeaderChange(name, (), tuple(values)))
    return result


def _text(info: BodyInfo) -> str | None:
    """The body as text, or ``None`` when it is binary."""
    if _is_binary_type(info.content_type):
        return None
    return _decode_text(info.body, info.charset, [])


def _normalise_json(text: str) -> str | None:
    """Pretty-printed with sorted keys, so only real changes differ; ``None`` if not JSON."""
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


def _cap(text: str, label: str, notes: list[str]) -> str:
    """Cut ``text`` to :data:`DIFF_LIMIT` characters (at a line end when one is near)."""
    if len(text) <= DIFF_LIMIT:
        return text
    newline = text.rfind("\n", 0, DIFF_LIMIT)
    cut = newline if newline > DIFF_LIMIT // 2 else DIFF_LIMIT
    notes.append(
        f"{label} body is {human_size(len(text.encode('utf-8', 'surrogatepass')))}; "
        f"only the first {human_size(DIFF_LIMIT)} is compared"
    )
    return text[:cut]


def diff_bodies(
    old: BodyInfo,
    new: BodyInfo,
    old_truncated: bool = False,
    new_truncated: bool = False,
) -> BodyDiff:
    """Compare two decoded bodies (see :class:`BodyDiff` for how)."""
    result = BodyDiff(
        old_size=len(old.body),
        new_size=len(new.body),
        old_sha256=hashlib.sha256(old.body).hexdigest(),
        new_sha256=hashlib.sha256(new.body).hexdigest(),
    )
    notes = result.notes
    notes.extend(f"original: {n}" for n in old.notes if "head incomplete" not in n)
    notes.extend(f"replay: {n}" for n in new.notes if "head incomplete" not in n)
    if old_truncated:
        notes.append("original body was truncated by the capture limit")
    if new_truncated:
        notes.append("replay body was truncated by the capture limit")
    if not old.body and not new.body:
        return result

    old_text, new_text = _text(old), _text(new)
    if (old.body and old_text is None) or (new.body and new_text is None):
        result.kind = "binary"
        result.same = result.old_sha256 == result.new_sha256
        return result
    old_text, new_text = old_text or "", new_text or ""

    result.kind = "text"
    jsonish = [
        _kind(info.content_type, text) == "json"
        for info, text in ((old, old_text), (new, new_text))
        if info.body
    ]
    if all(jsonish):
        pretty = [_normalise_json(t) if t else "" for t in (old_text, new_text)]
        if pretty[0] is not None and pretty[1] is not None:
            result.kind = "json"
            old_text, new_text = pretty[0], pretty[1]

    if old_text == new_text:
        if result.old_sha256 != result.new_sha256:
            notes.append(
                "bodies are equal once normalised (JSON formatting or key order differs)"
                if result.kind == "json"
                else "bodies are equal as text but differ in bytes (charset or encoding)"
            )
        return result
    result.same = False
    old_text = _cap(old_text, "original", notes)
    new_text = _cap(new_text, "replay", notes)
    if old_text == new_text:
        notes.append(f"the first {human_size(DIFF_LIMIT)} are equal; the bodies differ after that")
        return result
    result.old_lines = old_text.splitlines()
    result.new_lines = new_text.splitlines()
    matcher = difflib.SequenceMatcher(None, result.old_lines, result.new_lines)
    result.hunks = list(matcher.get_grouped_opcodes(CONTEXT_LINES))
    if not result.hunks:
        notes.append("the bodies differ only in line endings or a trailing newline")
    return result


def _status(half: Mapping[str, Any] | None, info: BodyInfo) -> tuple[int | None, str]:
    if not half:
        return None, ""
    code = half.get("status_code")
    text = str(half.get("status") or "")
    if not isinstance(code, int):
        parts = info.start_line.split(" ", 2)
        code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    return code, text or (str(code) if code is not None else "")


def _request_line(capture: Mapping[str, Any], info: BodyInfo) -> tuple[str, str]:
    req = capture.get("request") or {}
    parts = info.start_line.split(" ")
    method = str(req.get("method") or (parts[0] if parts else ""))
    uri = str(req.get("uri") or (parts[1] if len(parts) > 1 else ""))
    return method, uri


def diff_captures(original: Mapping[str, Any], replay: Mapping[str, Any]) -> CaptureDiff:
    """Compare a replay with its original (two capture detail objects from the agent API)."""
    sides: dict[str, SideDiff] = {}
    infos: dict[str, tuple[BodyInfo, BodyInfo]] = {}
    for side in ("request", "response"):
        a = original.get(side) or {}
        b = replay.get(side) or {}
        old, new = decode_body(_raw(a)), decode_body(_raw(b))
        infos[side] = (old, new)
        sides[side] = SideDiff(
            headers=diff_headers(_headers(old, a), _headers(new, b)),
            body=diff_bodies(old, new, bool(a.get("truncated")), bool(b.get("truncated"))),
        )
    old_method, old_uri = _request_line(original, infos["request"][0])
    new_method, new_uri = _request_line(replay, infos["request"][1])
    old_code, old_text = _status(original.get("response"), infos["response"][0])
    new_code, new_text = _status(replay.get("response"), infos["response"][1])
    return CaptureDiff(
        original_id=str(original.get("id", "")),
        replay_id=str(replay.get("id", "")),
        method=Change(old_method, new_method),
        uri=Change(old_uri, new_uri),
        status=Change(old_code, new_code),
        status_text=Change(old_text, new_text),
        request=sides["request"],
        response=sides["response"],
    )


# --- rendering -------------------------------------------------------------------------


def _esc(text: str) -> str:
    """Captured text with control characters made visible (never sent to the terminal)."""
    return _escape_controls(text)


def _header_lines(change: HeaderChange) -> tuple[list[str], list[str]]:
    return (
        [f"{change.name}: {_esc(v)}" for v in change.old],
        [f"{change.name}: {_esc(v)}" for v in change.new],
    )


def _binary_summary(size: int, digest: str) -> str:
    return f"binary, {human_size(size)} ({size:,} bytes), sha256 {digest[:16]}…"


def _unified_body(body: BodyDiff, lines: list[Text]) -> None:
    if body.kind == "empty":
        lines.append(Text("  body: none on either side", style=_SAME))
        return
    if body.kind == "binary":
        if body.same:
            lines.append(
                Text(
                    f"  body: same, {_binary_summary(body.old_size, body.old_sha256)}", style=_SAME
                )
            )
        else:
            lines.append(Text("  body (binary) differs:", style=_TITLE))
            lines.append(Text(f"  - {_binary_summary(body.old_size, body.old_sha256)}", style=_OLD))
            lines.append(Text(f"  + {_binary_summary(body.new_size, body.new_sha256)}", style=_NEW))
        return
    if body.same:
        lines.append(Text(f"  body: same ({body.kind}, {human_size(body.new_size)})", style=_SAME))
        return
    lines.append(Text(f"  body ({body.kind}) differs:", style=_TITLE))
    diff = body.unified()[2:]  # the section title already says which is which
    for line in diff[:RENDER_LINES]:
        style = {"@": _HUNK, "-": _OLD, "+": _NEW}.get(line[:1], _SAME)
        lines.append(Text("  " + _esc(line), style=style))
    if len(diff) > RENDER_LINES:
        lines.append(
            Text(f"  … {plural(len(diff) - RENDER_LINES, 'more diff line')} not shown", style=_NOTE)
        )


def _notes(body: BodyDiff, lines: list[Text]) -> None:
    lines.extend(Text(f"  ⚠ {note}", style=_NOTE) for note in body.notes)


def diff_title(diff: CaptureDiff, width: int) -> str:
    """``Replay <id> vs original <id> — <summary>`` in at most ``width`` cells: the ids go
    first when it is too long, then the summary is cut at a comma (or word) with ``…``."""
    summary = diff.summary()
    full = f"Replay {diff.replay_id} vs original {diff.original_id} — {summary}"
    if len(full) <= width:
        return full
    short = f"Replay vs original — {summary}"
    if len(short) <= width:
        return short
    head = "Replay vs original — "
    room = max(0, width - len(head) - 1)
    cut = summary[:room]
    for sep in (", ", " "):
        if sep in cut:
            cut = cut[: cut.rindex(sep)]
            break
    return (head + cut.rstrip(",: ") + "…")[: max(1, width)]


def render_unified(diff: CaptureDiff, title: bool = True) -> RenderableType:
    """The diff as coloured unified-diff text: ``-`` original (red), ``+`` replay (green).

    ``title=False`` leaves out the first line (ids and summary) for a screen that shows
    them in its own title."""
    lines: list[Text] = []
    if title:
        lines.append(
            Text(f"replay {diff.replay_id} vs original {diff.original_id}: {diff.summary()}", style=_TITLE)
        )
    lines.append(Text("Request", style=_TITLE))
    if diff.method.changed or diff.uri.changed:
        lines.append(Text(f"  - {diff.method.old} {_esc(diff.uri.old)}", style=_OLD))
        lines.append(Text(f"  + {diff.method.new} {_esc(diff.uri.new)}", style=_NEW))
    else:
        lines.append(Text(f"  {diff.method.new} {_esc(diff.uri.new)}", style=_SAME))
    for title, side in (("Request", diff.request), ("Response", diff.response)):
        if title == "Response":
            lines.append(Text("Response", style=_TITLE))
            if diff.status.changed or diff.status_text.changed:
                lines.append(Text(f"  - {diff.status_text.old or '(no response)'}", style=_OLD))
                lines.append(Text(f"  + {diff.status_text.new or '(no response)'}", style=_NEW))
            else:
                lines.append(Text(f"  {diff.status_text.new or '(no response)'}", style=_SAME))
        for change in side.headers.changes:
            old, new = _header_lines(change)
            lines.extend(Text(f"  - {line}", style=_OLD) for line in old)
            lines.extend(Text(f"  + {line}", style=_NEW) for line in new)
        if side.headers.unchanged:
            n = side.headers.unchanged
            lines.append(Text(f"  {plural(n, 'header')} unchanged", style=_SAME))
        _unified_body(side.body, lines)
        _notes(side.body, lines)
    return Group(*lines)


def _cell(text: str, style: str) -> Text:
    return Text(text, style=style, overflow="fold")


def _numbered(lines: list[str], index: int) -> str:
    return f"{index + 1:>5} {_esc(lines[index])}"


def _body_rows(body: BodyDiff, table: Table) -> None:
    if body.kind == "empty":
        table.add_row(_cell("(no body)", _SAME), _cell("(no body)", _SAME))
        return
    if body.kind == "binary":
        style_old, style_new = (_SAME, _SAME) if body.same else (_OLD, _NEW)
        table.add_row(
            _cell(_binary_summary(body.old_size, body.old_sha256), style_old),
            _cell(_binary_summary(body.new_size, body.new_sha256), style_new),
        )
        return
    if body.same:
        same = f"body same ({body.kind}, {human_size(body.new_size)})"
        table.add_row(_cell(same, _SAME), _cell(same, _SAME))
        return
    a, b = body.old_lines, body.new_lines
    pairs: list[tuple[Text, Text]] = []
    total = 0
    for hunk in body.hunks:
        i1, i2, j1, j2 = hunk[0][1], hunk[-1][2], hunk[0][3], hunk[-1][4]
        total += 1 + max(i2 - i1, j2 - j1)
        if len(pairs) < RENDER_LINES:
            pairs.append(
                (_cell(f"@@ -{_range(i1, i2)}", _HUNK), _cell(f"@@ +{_range(j1, j2)}", _HUNK))
            )
        for tag, a1, a2, b1, b2 in hunk:
            old_style, new_style = (_SAME, _SAME) if tag == "equal" else (_OLD, _NEW)
            for k in range(max(a2 - a1, b2 - b1)):
                if len(pairs) >= RENDER_LINES:
                    break
                left = _cell(_numbered(a, a1 + k), old_style) if a1 + k < a2 else Text("")
                right = _cell(_numbered(b, b1 + k), new_style) if b1 + k < b2 else Text("")
                pairs.append((left, right))
    for left, right in pairs:
        table.add_row(left, right)
    if total > len(pairs):
        more = f"… {plural(total - len(pairs), 'more diff line')} not shown"
        table.add_row(_cell(more, _NOTE), _cell(more, _NOTE))


def render_side_by_side(diff: CaptureDiff, width: int = 120, title: bool = True) -> RenderableType:
    """The diff as a two-column table, original on the left and replay on the right
    (``title=False``: without the summary above it).

    Only differing headers are listed (with a count of unchanged ones); bodies show
    each change with :data:`CONTEXT_LINES` of context and line numbers.
    """
    table = Table(
        box=box.SIMPLE_HEAD,
        width=max(width, 20),
        show_edge=False,
        pad_edge=False,
        title=Text(diff.summary(), style=_TITLE) if title else None,
    )
    table.add_column(f"original {diff.original_id}", ratio=1, overflow="fold")
    table.add_column(f"replay {diff.replay_id}", ratio=1, overflow="fold")

    def section(title: str) -> None:
        table.add_row(_cell(title, "bold underline"), _cell(title, "bold underline"))

    def pair(old: str, new: str, changed: bool) -> None:
        table.add_row(
            _cell(old, _OLD if changed else _SAME), _cell(new, _NEW if changed else _SAME)
        )

    section("Request")
    pair(
        f"{diff.method.old} {_esc(diff.uri.old)}",
        f"{diff.method.new} {_esc(diff.uri.new)}",
        diff.method.changed or diff.uri.changed,
    )
    for title, side in (("Request", diff.request), ("Response", diff.response)):
        if title == "Response":
            section("Response")
            pair(
                diff.status_text.old or "(no response)",
                diff.status_text.new or "(no response)",
                diff.status.changed or diff.status_text.changed,
            )
        for change in side.headers.changes:
            old, new = _header_lines(change)
            for k in range(max(len(old), len(new))):
                table.add_row(
                    _cell(old[k], _OLD) if k < len(old) else Text(""),
                    _cell(new[k], _NEW) if k < len(new) else Text(""),
                )
        if side.headers.unchanged:
            n = side.headers.unchanged
            same = f"{plural(n, 'header')} unchanged"
            table.add_row(_cell(same, _SAME), _cell(same, _SAME))
        _body_rows(side.body, table)
        for note in side.body.notes:
            table.add_row(_cell(f"⚠ {note}", _NOTE), Text(""))
    return table
