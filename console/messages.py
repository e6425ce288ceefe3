"""Messages that workers post to the app: all I/O results arrive this way.

Workers never touch widgets; the app's handlers own the state.  The flow reads:
``StatusLoaded / TunnelsLoaded / EndpointsLoaded / RowsLoaded / AgentEvent`` in,
``ActionDone / ActionFailed`` for what the user asked.
"""

from __future__ import annotations

from textual.message import Message


class StatusLoaded(Message):
    def __init__(self, status: dict) -> None:
        super().__init__()
        self.status = status


class TunnelsLoaded(Message):
    def __init__(self, tunnels: list[dict]) -> None:
        super().__init__()
        self.tunnels = tunnels


class EndpointsLoaded(Message):
    def __init__(self, endpoints: list[dict]) -> None:
        super().__init__()
        self.endpoints = endpoints


class IngressesLoaded(Message):
    def __init__(self, ingresses: list[dict]) -> None:
        super().__init__()
        self.ingresses = ingresses


class FilterChecked(Message):
    """The agent's verdict on a Requests filter: ``error`` is None when it was accepted."""

    def __init__(self, text: str, error: str | None) -> None:
        super().__init__()
        self.text = text
        self.error = error


class RowsLoaded(Message):
    def __init__(
        self,
        offset: int,
        items: list[dict],
        total: int,
        generation: int,
        newest: str | None = None,
        stored: int | None = None,
    ) -> None:
        super().__init__()
        self.offset = offset
        self.items = items
        self.total = total
        self.generation = generation
        self.newest = newest
        self.stored = stored  # every capture the agent holds, for "matched/total"


class SummaryLoaded(Message):
    """The capture under the Requests cursor, for the split's headers pane."""

    def __init__(self, capture: dict) -> None:
        super().__init__()
        self.capture = capture


class CaptureLoaded(Message):
    def __init__(self, capture: dict) -> None:
        super().__init__()
        self.capture = capture


class AgentEvent(Message):
    """One event from the agent's stream (or synthesised by polling)."""

    def __init__(self, name: str, data: dict) -> None:
        super().__init__()
        self.name = name
        self.data = data


class Connection(Message):
    """The APIs became reachable or unreachable (``error`` says why)."""

    def __init__(self, which: str, ok: bool, error: str = "") -> None:
        super().__init__()
        self.which = which
        self.ok = ok
        self.error = error


class ActionDone(Message):
    def __init__(self, text: str, refresh: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.text = text
        self.refresh = refresh


class ActionFailed(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
