"""Load-balance-aware pruning: masks against a NumPy reference, any layer type, and the simulator's verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.compress.balance import balanced_mask, load_balance, pe_loads, prune_balanced_
from deepshrink.compress.prune import prune_
from deepshrink.compress.quantize import compressed_tensors, share_weights_
from deepshrink.errors import DeepShrinkError
from deepshrink.hardware import EIEConfig, simulate_layer
from deepshrink.tensor import CompressedTensor


def reference_mask(weight: np.ndarray, sparsity: float, n_pe: int) -> np.ndarray:
    """Sort each PE's rows' magnitudes and keep the largest, one PE at a time."""
    matrix = np.abs(weight.reshape(weight.shape[0], math.prod(weight.shape[1:])))
    mask = np.zeros(matrix.shape, dtype=bool)
    for pe in range(n_pe):
        rows = np.arange(pe, matrix.shape[0], n_pe)
        flat = matrix[rows].reshape(-1)
        n_keep = flat.size - math.floor(sparsity * flat.size)
        keep = np.zeros(flat.size, dtype=bool)
        keep[np.argsort(-flat, kind="stable")[:n_keep]] = True
        mask[rows] = keep.reshape(len(rows), matrix.shape[1])
    return mask.reshape(weight.shape)


def skewed_weight(rows: int, cols: int, n_pe: int, seed: int = 0) -> torch.Tensor:
    """Rows of low-numbered PEs hold larger weights: plain pruning piles work on them."""
    rng = np.random.default_rng(seed)
    scale = 1.0 + 3.0 * (np.arange(rows) % n_pe < n_pe // 4)
    return torch.from_numpy((rng.standard_normal((rows, cols)) * scale[:, None]).astype(np.float32))


@pytest.mark.parametrize(
    "shape, sparsity, n_pe",
    [
        ((64, 30), 0.9, 8),
        ((37, 11), 0.75, 5),
        ((8, 3, 3, 3), 0.5, 4),
        ((3, 10), 0.6, 8),
        ((16, 16), 0.0, 4),
        ((0, 4), 0.5, 2),
    ],
)
def test_balanced_mask_matches_reference(shape: tuple, sparsity: float, n_pe: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(balanced_mask(w, sparsity, n_pe).numpy(), reference_mask(w.numpy(), sparsity, n_pe))


def test_every_pe_gets_the_same_work_on_lstm_gates() -> None:
    lstm = nn.LSTM(24, 32, num_layers=2)
    report = prune_balanced_(lstm, 0.875, n_pe=16)
    assert [r.name for r in report] == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    share_weights_(lstm, bits=4)
    for name, ct in compressed_tensors(lstm).items():
        loads = pe_loads(ct, 16)
        assert (loads == loads[0]).all(), name  # 128 rows / 16 PEs: identical sub-matrices
        assert ct.nnz == ct.numel - 16 * math.floor(0.875 * ct.numel // 16)
        assert load_balance(ct, 16) == 1.0


def test_plain_pruning_is_unbalanced_and_balanced_is_faster_on_the_simulator() -> None:
    w = skewed_weight(256, 128, n_pe=16)
    plain, balanced = nn.Linear(128, 256), nn.Linear(128, 256)
    for layer in (plain, balanced):
        layer.weight.data.copy_(w)
    prune_(plain, 0.9)
    prune_balanced_(balanced, 0.9, n_pe=16)
    cts = [CompressedTensor.from_dense(torch.round(m.weight.detach() * 8) / 8) for m in (plain, balanced)]
    assert abs(cts[0].nnz - cts[1].nnz) <= 16  # the same overall sparsity, up to rounding per PE
    assert load_balance(cts[0], 16) < 0.5 < 0.99 < load_balance(cts[1], 16)
    config = EIEConfig(n_pe=16)
    cycles = [simulate_layer(ct, np.ones(128, np.float32), config=config).cycles for ct in cts]
    assert cycles[1] < 0.6 * cycles[0]


def test_composes_with_plain_pruning_and_never_revives() -> None:
    # Built, not drawn: with random weights, whether plain pruning leaves some PE more than the
    # balanced count (and so loses weights to it) is a matter of the draw.
    net = nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Conv1d(4, 8, 3))
    rank = torch.zeros(8, 12)  # the conv's matrix view, |weights| 1..96; PE p owns rows p and p + 4
    rank[[0, 4]] = torch.arange(73, 97.0).reshape(2, 12)  # PE 0: the 24 largest
    rank[[1, 5]] = torch.cat([torch.arange(49, 61.0), torch.arange(1, 13.0)]).reshape(2, 12)
    rank[[2, 6]] = torch.cat([torch.arange(61, 73.0), torch.arange(13, 25.0)]).reshape(2, 12)
    rank[[3, 7]] = torch.arange(25, 49.0).reshape(2, 12)  # PE 3: all below the median
    with torch.no_grad():
        net[0].weight.copy_(skewed_weight(40, 20, n_pe=4))
        net[2].weight.copy_((rank * (-1) ** torch.arange(96.0).reshape(8, 12)).reshape(8, 4, 3))
    prune_(net, 0.5)
    alive = [net[0].weight.detach() != 0, net[2].weight.detach() != 0]
    assert [int(alive[1][pe::4].sum()) for pe in range(4)] == [24, 12, 12, 0]
    prune_balanced_(net, {"0.weight": 0.8, "2.weight": 0.3}, n_pe=4)
    assert not (net[0].weight.detach() != 0)[~alive[0]].any()
    assert int((net[0].weight != 0).sum()) == 800 - 4 * math.floor(0.8 * 200)
    # 0.3 of each PE's 24 leaves 17: PE 0 loses its 7 smallest (73..79), the others keep what
    # they have and nothing comes back, not even to PE 3, which has none
    kept = (net[2].weight.detach() != 0).reshape(8, 12)
    assert torch.equal(kept, (rank > 48) & ~((rank >= 73) & (rank <= 79)))


def test_rows_not_divisible_by_pes_keep_proportionally() -> None:
    mask = balanced_mask(torch.randn(10, 10), 0.5, 4)  # PEs own 3, 3, 2, 2 rows
    loads = [int(mask[pe::4].sum()) for pe in range(4)]
    assert loads == [15, 15, 10, 10]


def test_pe_loads_and_balance_against_bincount() -> None:
    dense = torch.zeros(6, 4)
    dense[0, :] = 1.0
    dense[3, 1] = 2.0
    dense[5, 2] = 1.0
    ct = CompressedTensor.from_dense(dense)
    assert pe_loads(ct, 3).tolist() == [5, 0, 1]  # rows 0, 3 -> PE 0; row 5 -> PE 2
    assert load_balance(ct, 3) == pytest.approx(2 / 5)
    assert load_balance(CompressedTensor.from_dense(torch.zeros(4, 4)), 2) == 1.0  # empty: nothing to wait for


@pytest.mark.parametrize("n_pe", [0, -2, 1.5, True, "8"])
def test_bad_n_pe(n_pe: object) -> None:
    with pytest.raises(DeepShrinkError, match="must be a positive integer"):
        prune_balanced_(nn.Linear(4, 4), 0.5, n_pe)


def test_bad_sparsity_pattern_and_shared_layer() -> None:
    with pytest.raises(DeepShrinkError, match=r"sparsity\[weight\]=1.0 must be a number in \[0, 1\)"):
        prune_balanced_(nn.Linear(4, 4), 1.0, 2)
    with pytest.raises(DeepShrinkError, match="matches no compressible weight"):
        prune_balanced_(nn.Sequential(nn.Linear(4, 4)), 0.5, 2, layers=["fc9"])
    shared = nn.Linear(4, 4)
    share_weights_(shared, bits=2)
    with pytest.raises(DeepShrinkError, match="prune before weight sharing"):
        prune_balanced_(shared, 0.5, 2)


def test_cli_balance_reports_per_pe_loads(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from deepshrink.cli import main
    from deepshrink.fileformat.model_io import save

    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    net[0].weight.data.copy_(skewed_weight(32, 16, n_pe=8))
    prune_balanced_(net, {"0.weight": 0.75}, n_pe=8)
    prune_(net, {"2.weight": 0.75})
    share_weights_(net, bits=4)
    path = tmp_path / "net.dsz"
    save(net, path)
    assert main(["balance", str(path), "--pes", "8"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "0.weight" in line)
    assert "32 x 16" in row and "16 / 16" in row and "1.000" in row
    assert main(["balance", str(path), "--pes", "0"]) == 2
    assert "argument --pes: '0' is not an integer above 0" in capsys.readouterr().err
