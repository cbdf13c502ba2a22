"""What the terminal shows: tables readable at 80 columns with names whole, progress bars only where wanted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import deepshrink
from deepshrink import cli, progress
from deepshrink.compress import compressed_tensors, prune_, sensitivity_scan, share_weights_
from deepshrink.compress.sensitivity import Sensitivity
from deepshrink.hardware import simulate_network
from deepshrink.hardware.report import results_table
from deepshrink.report import layer_table


def _nested(path: str, leaf: nn.Module) -> nn.Module:
    """``leaf`` at ``path`` (``"a.b.c"``) under fresh containers, as a wrapped transformer names its layers."""
    head, _, rest = path.partition(".")
    root = nn.Module()
    root.add_module(head, _nested(rest, leaf) if rest else leaf)
    return root


class Deep(nn.Module):
    """Layers named like a sentence-transformer's: ``0.auto_model.encoder.layer.N.attention.self.query``."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", _nested("auto_model.encoder", nn.Module()))
        layers = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.attention = _nested("self", nn.Module())
            for name in ("query", "key", "value"):
                block.attention.self.add_module(name, nn.Linear(32, 32))
            block.intermediate = _nested("dense", nn.Linear(32, 64))
            layers.append(block)
        getattr(self, "0").auto_model.encoder.layer = layers


@pytest.fixture
def deep_file(tmp_path: Path) -> tuple[Path, list[str]]:
    torch.manual_seed(0)
    model = Deep()
    prune_(model, 0.8, progress=False)
    share_weights_(model, bits=4, progress=False)
    path = tmp_path / "deep.dsz"
    deepshrink.save(model, path, progress=False)
    return path, list(compressed_tensors(model))


def _print(*renderables: object, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO())
    for r in renderables:
        console.print(r)
    return console.file.getvalue()


def _readable(out: str, names: list[str], rows: int, width: int = 80) -> None:
    """Every line fits, nothing is cut, each name is whole, and no row takes more than three lines."""
    assert max(len(line) for line in out.splitlines()) <= width
    assert "…" not in out
    squeezed = "".join(out.split())
    assert all(name in squeezed for name in names), [n for n in names if n not in squeezed]
    assert len(out.splitlines()) <= 3 * rows + 10


def test_info_at_80_columns_keeps_names_whole(deep_file, monkeypatch, capsys) -> None:
    path, names = deep_file
    assert max(map(len, names)) > 50
    monkeypatch.setattr(cli, "console", Console(width=80, file=io.StringIO()))
    assert cli.main(["info", str(path)]) == 0
    out = cli.console.file.getvalue()
    layer_part, _, coder_part = out.partition("bits per symbol")
    _readable(layer_part, names, len(names) + 3)
    _readable(coder_part, names, len(names))


def test_info_wide_and_json(deep_file, monkeypatch, capsys) -> None:
    path, names = deep_file
    monkeypatch.setattr(cli, "console", Console(width=80, file=io.StringIO()))
    assert cli.main(["info", str(path), "--wide"]) == 0
    out = cli.console.file.getvalue()
    assert all(name in out for name in names)  # each on one line
    assert "P+Q / coded" in out and "layout / coders" in out and "…" not in out
    assert max(len(line) for line in out.splitlines()) > 80  # past the console, not cut to it
    assert cli.main(["info", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in report["tensors"]] == names
    assert report["total_bytes"] == path.stat().st_size


def test_the_other_tables_keep_names_whole_at_80_columns(deep_file) -> None:
    torch.manual_seed(0)
    model = Deep()
    prune_(model, 0.8, progress=False)
    tensors = compressed_tensors(model)
    names = list(tensors)
    sims = simulate_network(tensors, act_density=0.5).layers
    scan = Sensitivity(0.9, (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), {n: [0.9] * 6 for n in names})
    for table in (layer_table(model), scan.table(), results_table(sims)):
        _readable(_print(table), names, len(names) + 1)


def test_balance_table_at_80_columns(deep_file, monkeypatch) -> None:
    path, names = deep_file
    monkeypatch.setattr(cli, "console", Console(width=80, file=io.StringIO()))
    assert cli.main(["balance", str(path), "--pes", "8"]) == 0
    _readable(cli.console.file.getvalue(), names, len(names))


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """Progress bars draw into this buffer as if it were a terminal, with no delay."""
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "_console", lambda: Console(file=buffer, force_terminal=True, width=80))
    monkeypatch.setattr(progress, "DELAY", 0.0)
    return buffer


def _small() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prune_(net, 0.5, progress=False)
    return net


def test_bars_draw_on_a_terminal_unless_asked_not_to(terminal: io.StringIO, tmp_path: Path) -> None:
    share_weights_(_small(), bits=3)
    assert "sharing weights" in terminal.getvalue()
    terminal.truncate(0)
    terminal.seek(0)
    share_weights_(_small(), bits=3, progress=False)
    deepshrink.save(_small(), tmp_path / "m.dsz", progress=False)
    deepshrink.load_into(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), tmp_path / "m.dsz", progress=False)
    with progress.quiet():
        share_weights_(_small(), bits=3)
        deepshrink.read(tmp_path / "m.dsz")
    assert terminal.getvalue() == ""


def test_cli_quiet_silences_the_bars(terminal: io.StringIO, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cli, "console", Console(file=io.StringIO()))
    path = tmp_path / "m.dsz"
    deepshrink.save(_small(), path, progress=False)
    assert cli.main(["info", str(path)]) == 0
    assert "decoding" in terminal.getvalue()
    terminal.truncate(0)
    terminal.seek(0)
    assert cli.main(["info", str(path), "--quiet"]) == 0 and cli.main(["-q", "info", str(path)]) == 0
    assert terminal.getvalue() == ""


def test_a_step_inside_a_bar_draws_none_of_its_own(terminal: io.StringIO) -> None:
    """rich draws one live display at a time: the scan's evaluations stay silent instead of failing."""
    data = (torch.randn(64, 8), torch.randint(0, 2, (64,)))
    scan = sensitivity_scan(_small(), data, [0.5, 0.9])  # a second live display would raise rich's LiveError
    assert "sensitivity scan" in terminal.getvalue() and len(scan.accuracy["0.weight"]) == 2


def test_nothing_is_printed_off_a_terminal(tmp_path: Path, capfd, monkeypatch) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    net = _small()
    share_weights_(net, bits=3)
    deepshrink.save(net, tmp_path / "m.dsz")
    deepshrink.load_into(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), tmp_path / "m.dsz")
    sensitivity_scan(_small(), (torch.randn(16, 8), torch.randint(0, 2, (16,))), [0.5])
    assert capfd.readouterr() == ("", "")
