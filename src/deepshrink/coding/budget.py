"""The reader's budget: how many elements decoding one file may allocate, charged before each allocation.

A small file can describe a lot: a stream of 64 symbols a byte, a bitmap of
all ones, a decode table of 2**16 entries from an 8-byte code table. Every
decoder charges what it is about to allocate (symbols, positions, array
elements, table entries) to one :class:`DecodeBudget` per file *before*
allocating it, so a file decodes to at most ``max_elements`` elements however
it is built. The default admits every model this project ships and the real
ones it compresses (a 22.7 M-parameter sentence encoder stored unpruned uses
about 51 M); a caller who trusts a bigger file raises it.

Examples:
    >>> budget = DecodeBudget(100)
    >>> budget.charge(60, "tensor 'w': positions")
    >>> budget.charge(60, "tensor 'w': codes")
    Traceback (most recent call last):
    ...
    deepshrink.errors.FileFormatError: tensor 'w': codes needs 60 elements, but the reader's budget ...
"""

from __future__ import annotations

from deepshrink.errors import DeepShrinkError, FileFormatError

DEFAULT_MAX_ELEMENTS = 1 << 26  # about 67 M elements: at most ~0.5 GB of int64 positions


def check_max_elements(max_elements: object) -> int:
    """Validate a budget.

    Raises:
        DeepShrinkError: unless a non-negative integer.
    """
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 0:
        raise DeepShrinkError(f"max_elements={max_elements!r} must be a non-negative integer")
    return max_elements


class DecodeBudget:
    """Elements a reader may still allocate for one file.

    Args:
        max_elements: the total; see :data:`DEFAULT_MAX_ELEMENTS`.

    Raises:
        DeepShrinkError: ``max_elements`` is not a non-negative integer.
    """

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        self.limit = check_max_elements(max_elements)
        self.used = 0

    def require(self, n: int, what: str) -> None:
        """Check that ``n`` more elements fit, without counting them (a file's declared total, up front).

        Raises:
            FileFormatError: they do not.
        """
        if self.used + n > self.limit:
            raise FileFormatError(
                f"{what} needs {n:,} elements, but the reader's budget of max_elements={self.limit:,} has "
                f"{self.limit - self.used:,} left; if you trust this file, pass a larger max_elements "
                "(read, load, export; --max-elements on the command line)"
            )

    def charge(self, n: int, what: str) -> None:
        """Count ``n`` elements about to be allocated for ``what``.

        Raises:
            FileFormatError: the file would pass the budget (nothing is allocated then).
        """
        self.require(n, what)
        self.used += n
