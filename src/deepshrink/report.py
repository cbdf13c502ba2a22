"""Per-layer tables (rich) of what compression did to a model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from deepshrink.compress.parametrization import compression_of
from deepshrink.compress.prune import sparsity_report
from deepshrink.compress.targets import find_targets
from deepshrink.tables import NameTable


def layer_rows(model: nn.Module) -> list[dict]:
    """One dict per compressible weight: name, shape, weights, kept, kept %, bits, codebook size."""
    rows = []
    by_name = {t.name: t for t in find_targets(model, warn_unsupported=False)}
    for r in sparsity_report(model):
        comp = compression_of(by_name[r.name].module, by_name[r.name].param)
        codebook = getattr(comp, "codebook", None)
        rows.append(
            {
                "layer": r.name,
                "shape": "x".join(map(str, r.shape)),
                "weights": r.weights,
                "kept": r.kept,
                "kept %": 100 * r.kept_fraction,
                "bits": getattr(comp, "bits", 32),
                "codebook": codebook.numel() if codebook is not None else 0,
            }
        )
    return rows


def rows_table(rows: Sequence[dict], title: str = "", total: dict | None = None) -> NameTable:
    """A table of ``rows`` (dicts with the same keys, the first one naming the row: never cut, see
    :class:`~deepshrink.tables.NameTable`); fractions get 4 decimals, other floats 2."""
    keys = list(rows[0] if rows else total or {"layer": ""})
    table = NameTable(keys[1:], title, name_heading=keys[0])
    for row in rows + ([total] if total else []):
        name, *cells = (_cell(v) for v in row.values())
        table.add_row(name, *cells, style="bold" if row is total else None)
    return table


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def layer_table(model: nn.Module, title: str = "layers") -> NameTable:
    """Per-layer table of ``model`` with a total row."""
    rows = layer_rows(model)
    weights = sum(r["weights"] for r in rows)
    kept = sum(r["kept"] for r in rows)
    total = {
        "layer": "total",
        "shape": "",
        "weights": weights,
        "kept": kept,
        "kept %": 100 * kept / max(weights, 1),
        "bits": "",
        "codebook": "",
    }
    return rows_table(rows, title, total)
