"""The footer: Textual's, with the keys in the keymap's explicit footer order.

Textual lists the focused widget's keys first and the app's last, so on a narrow
terminal the first thing cut was ``? help``.  Here every key has a place
(``Key.footer`` in :mod:`console.keymap`): ``? help`` and ``q quit`` come first and
survive at 80 columns; the rest keep their order after them.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from console.keymap import footer_rank


class BurrowFooter(Footer):
    def compose(self) -> ComposeResult:
        widgets = list(super().compose())
        rank = {
            (binding.key, binding.action): footer_rank(binding.id)
            for _, binding, _, _ in self.screen.active_bindings.values()
        }

        def is_key(w) -> bool:
            return isinstance(w, FooterKey) and not w.has_class("-command-palette")

        keys = sorted((w for w in widgets if is_key(w)), key=lambda w: rank.get((w.key, w.action), 100))
        yield from keys
        yield from (w for w in widgets if not is_key(w))
