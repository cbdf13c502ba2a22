"""Tables whose first column holds names (layers, weights, stages) that are never cut.

Every per-layer table the command line prints is a :class:`NameTable`. At the
console's width, when the table with each name on one line does not fit, the long
names are broken after their dots (``0.auto_model.encoder.`` / ``layer.0.attention.``
/ ``self.query.weight``) onto as many lines as they need, the row's figures sitting
on the name's last line; the figure columns never wrap and no name is ever cut
with an ellipsis. ``wide=True`` keeps every name on one line whatever the width
(for ``--wide``; :func:`print_table` prints it past the console's width).

Examples:
    >>> from rich.console import Console
    >>> table = NameTable(["weights", "kept"], title="layers")
    >>> table.add_row("encoder.layer.0.attention.self.query.weight", "147,456", "10.0%")
    >>> console = Console(width=40)
    >>> with console.capture() as out:
    ...     console.print(table)
    >>> print(out.get())  # doctest: +NORMALIZE_WHITESPACE
    layers
     layer                  weights   kept
     ─────────────────────────────────────
     encoder.layer.0.
     attention.self.query.
     weight                 147,456  10.0%
    <BLANKLINE>
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

MIN_NAME_WIDTH = 12  # narrower than this, a name would take more lines than it saves
_BREAK_AFTER = re.compile(r"(?<=[./_-])")  # names break after a separator, keeping it on the line


def break_name(name: str, width: int) -> str:
    """``name`` on lines of at most ``width`` characters, broken after ``.``, ``/``, ``_`` or ``-``.

    A part longer than ``width`` between separators is split where it must be.

    Examples:
        >>> print(break_name("layer.0.attention.self.query.weight", 18))
        layer.0.attention.
        self.query.weight
    """
    lines, line = [], ""
    for part in _BREAK_AFTER.split(name):
        while len(part) > width:  # no separator close enough: cut the part itself
            room = width - len(line)
            lines.append(line + part[:room])
            line, part = "", part[room:]
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line] if line else lines)


@dataclass
class NameTable:
    """A rich renderable table: a name column, then figure columns that stay on one line.

    Args:
        columns: headings of the figure columns (right-aligned); keep them short,
            a ``"\\n"`` puts a heading on two lines.
        title: shown above the table.
        name_heading: heading of the name column.
        caption: shown below the table.
        wide: never break names (``--wide``).
    """

    columns: Sequence[str]
    title: str = ""
    name_heading: str = "layer"
    caption: str | None = None
    wide: bool = False
    rows: list[tuple[str, tuple[str, ...], bool, str | None]] = field(default_factory=list, repr=False)

    def add_row(self, name: str, *cells: str, end_section: bool = False, style: str | None = None) -> None:
        """One row: its name and one string per figure column (fewer are padded with blanks)."""
        self.rows.append((name, cells + ("",) * (len(self.columns) - len(cells)), end_section, style))

    def table(self, name_width: int | None = None) -> Table:
        """The rich table, names broken to ``name_width`` characters (``None``: never)."""
        table = Table(caption=self.caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column(self.name_heading, no_wrap=True)
        for heading in self.columns:
            table.add_column(heading, justify="right", no_wrap=True, vertical="bottom")
        for name, cells, end_section, style in self.rows:
            shown = name if name_width is None else break_name(name, name_width)
            table.add_row(shown, *cells, end_section=end_section, style=style)
        return table

    def natural_width(self, console: Console) -> int:
        """The width the table takes with every name on one line."""
        return _natural_width(console, console.options, self.table())

    def _name_widths(self) -> Iterator[int]:
        yield from (len(name) for name, *_ in self.rows)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if self.title:  # above the table, not in it: a long title (a file's path) wraps at the console's width
            yield Text(self.title, style="table.title")
        whole = self.table()
        natural = _natural_width(console, options, whole)
        if self.wide or natural <= options.max_width or not self.rows:
            yield whole
            return
        longest = max(self._name_widths())
        budget = max(options.max_width - (natural - max(longest, len(self.name_heading))), MIN_NAME_WIDTH)
        yield self.table(budget)


def _natural_width(console: Console, options: ConsoleOptions, table: Table) -> int:
    """The width ``table`` takes when nothing limits it (a measurement is otherwise capped at the console's)."""
    return Measurement.get(console, options.update(max_width=1 << 16), table).maximum


def print_table(console: Console, table: NameTable) -> None:
    """Print ``table``; a wide one at its full width even past the console's (a terminal wraps those lines,
    a pager with ``less -S`` or a file does not)."""
    if not table.wide:
        console.print(table)
        return
    width = console.width
    console.width = max(width, table.natural_width(console))
    try:
        console.print(table)
    finally:
        console.width = width
