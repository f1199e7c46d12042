"""Peer-chosen text made safe for where it is shown: a terminal, a spreadsheet.

A peer's name, organization, device and version reach every monitor and every `swarm status`
verbatim (bounded in length by :class:`swarm.net.metrics_record.PeerMetrics`, but free in content).
Printed raw, an ESC sequence in a name can rewrite a terminal's screen or title; exported raw, a
name starting with ``=`` runs as a formula when the CSV is opened in a spreadsheet. Everything that
prints or exports peer text goes through one of the two functions here.
"""

from __future__ import annotations

import re
from typing import Optional

# C0 and C1 control characters and DEL (ESC, BEL, CR, ... and 0x9b, the one-byte CSI), plus the
# Unicode bidirectional overrides that reorder what a terminal shows ("Trojan Source")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# what spreadsheets read as the start of a formula (OWASP's "CSV injection" list)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
MAX_SHOWN = 64  # characters of a peer-chosen string shown in a table (the record's own bound)


def printable(value: Optional[str], *, max_length: int = MAX_SHOWN, missing: str = "-") -> str:
    """``value`` for a terminal: each control character replaced by ``?``, cut to ``max_length``
    characters (with ``…``), or ``missing`` for None or an empty string."""
    if not value:
        return missing
    shown = _CONTROL.sub("?", value)
    return shown if len(shown) <= max_length else shown[:max_length - 1] + "…"


def csv_cell(value):
    """``value`` for a CSV cell: a string that a spreadsheet would read as a formula gets a leading ``'``;
    anything else (numbers, None, other strings) is returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
