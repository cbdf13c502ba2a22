"""The EIE cycle and energy model: published figures, invariants, inputs, errors, real MNIST layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepshrink.errors import DeepShrinkError, UnsupportedLayerError
from deepshrink.hardware import (
    EIEConfig,
    EnergyTable,
    benchmark_layer,
    pe_layout,
    simulate_layer,
    simulate_network,
    synthetic_activations,
    synthetic_layer,
)
from deepshrink.hardware.activations import layer_inputs
from deepshrink.tensor import CompressedTensor

ALEX7_PUBLISHED_US = 12.2  # EIE (Han et al., ISCA 2016): Alex-7 on 64 PEs, 800 MHz, FIFO depth 8


@pytest.fixture(scope="module")
def alex7() -> CompressedTensor:
    layer = benchmark_layer("Alex-7")
    return synthetic_layer(layer.outputs, layer.inputs, layer.weight_density, seed=1)


def test_alex7_lands_within_10_percent_of_the_published_time(alex7):
    result = simulate_layer(alex7, act_density=0.353)
    assert result.time_per_vector_s * 1e6 == pytest.approx(ALEX7_PUBLISHED_US, rel=0.10)
    assert 0.85 < result.load_efficiency < 1.0  # EIE: actual about 10% above theoretical


def test_fifo_depth_one_leaves_about_half_the_cycles_idle(alex7):
    shallow = simulate_layer(alex7, act_density=0.353, config=EIEConfig(fifo_depth=1))
    assert 0.4 < shallow.load_efficiency < 0.65


def test_deeper_queues_never_slow_a_layer_down(alex7):
    cycles = [
        simulate_layer(alex7, act_density=0.353, config=EIEConfig(fifo_depth=d)).cycles for d in (1, 2, 4, 8, 16, 64)
    ]
    assert cycles == sorted(cycles, reverse=True)
    assert cycles[0] > 1.5 * cycles[-1]


def test_cycle_accounting_is_consistent(alex7):
    r = simulate_layer(alex7, act_density=0.353)
    # every busy cycle is a MAC on a weight, a MAC on a padding zero, or a pointer-only cycle
    assert r.pe_busy_cycles.sum() == r.macs + r.padding_macs + r.empty_slices
    assert r.cycles >= r.ideal_cycles and r.cycles > r.pe_busy_cycles.max()
    assert r.events.pointer_reads == 2 * 64 * r.active_columns
    assert r.fits_on_chip and r.events.dram_bits == 0
    # the MACs are exactly the kept weights of the broadcast columns
    active = np.flatnonzero(synthetic_activations(4096, 0.353, seed=0))
    _, cols = alex7.rows_cols()
    assert r.macs == np.isin(cols, active).sum()


def test_padding_counts_from_the_tensor_slices():
    # One column, 40 rows, weights at rows 0 and 39. With 1 PE the gap of 38 zeros needs
    # two padding zeros (4-bit index); with 2 PEs both weights sit in different slices.
    dense = torch.zeros(40, 1)
    dense[0, 0], dense[39, 0] = 1.0, 2.0
    ct = CompressedTensor.from_dense(dense)
    one = simulate_layer(ct, np.ones(1), config=EIEConfig(n_pe=1))
    assert (one.macs, one.padding_macs, one.cycles) == (2, 2, 1 + 4)  # one cycle latency + 4 entries
    two = pe_layout(ct, 2, 4)
    assert two.kept[:, 0].tolist() == [1, 1] and two.padding[:, 0].tolist() == [0, 1]  # PE 1: row 39 is local 19


def test_an_all_zero_matrix_costs_one_pointer_cycle_per_activation():
    ct = CompressedTensor((64, 50), np.empty(0, np.int64), np.empty(0, np.uint8), np.zeros(1, np.float32), 4)
    r = simulate_layer(ct, act_density=0.5, config=EIEConfig(n_pe=4))
    assert (r.macs, r.padding_macs, r.active_columns) == (0, 0, 25)
    assert r.cycles == 25 + 1 and r.events.matrix_sram_reads == 0


def test_zero_activations_cost_no_cycles(alex7):
    r = simulate_layer(alex7, np.zeros(4096))
    assert (r.cycles, r.macs, r.events.pointer_reads) == (0, 0, 0)
    assert r.energy_pj["mac"] == 0 and r.energy_total_pj > 0  # the scan and output writes remain


def test_a_batch_is_the_sum_of_its_vectors():
    ct = synthetic_layer(300, 200, 0.1, seed=3)
    x = np.stack([synthetic_activations(200, d, seed=i) for i, d in enumerate((0.2, 0.5, 0.9))])
    batch = simulate_layer(ct, torch.from_numpy(x), config=EIEConfig(n_pe=16))
    singles = [simulate_layer(ct, v, config=EIEConfig(n_pe=16)) for v in x]
    assert batch.vectors == 3
    assert batch.cycles == sum(s.cycles for s in singles)
    assert batch.energy_total_pj == pytest.approx(sum(s.energy_total_pj for s in singles))
    np.testing.assert_array_equal(batch.pe_busy_cycles, sum(s.pe_busy_cycles for s in singles))


def test_energy_follows_the_table(alex7):
    base = simulate_layer(alex7, act_density=0.353)
    cheap = simulate_layer(alex7, act_density=0.353, config=EIEConfig(energy=EnergyTable(int_mult_pj=0.0)))
    assert base.energy_pj["mac"] == pytest.approx(base.events.macs * 3.2)
    assert cheap.energy_pj["mac"] == pytest.approx(base.events.macs * 0.1)
    assert cheap.energy_pj["matrix_sram"] == base.energy_pj["matrix_sram"]
    # 64-bit rows of eight 8-bit entries: at least entries / 8 reads, at most one more per slice
    entries = base.macs + base.padding_macs
    assert entries / 8 <= base.events.matrix_sram_reads <= entries / 8 + 64 * base.active_columns


def test_a_layer_too_big_for_the_srams_reads_dram():
    ct = synthetic_layer(64, 2000, 0.5, seed=0)
    small = EIEConfig(n_pe=4, matrix_sram_bytes=1024, pointer_sram_bytes=1024)
    r = simulate_layer(ct, act_density=0.5, config=small)
    assert not r.fits_on_chip
    matrix_bits = (pe_layout(ct, 4, 4).entries.sum(axis=1) * 8).clip(min=0)
    expected = (matrix_bits - 8192).clip(min=0).sum() + 4 * max(2001 * 16 - 8192, 0)
    assert r.events.dram_bits == expected and r.energy_pj["dram"] == pytest.approx(expected / 32 * 640)


def test_more_pes_go_faster_on_a_big_layer(alex7):
    times = [simulate_layer(alex7, act_density=0.353, config=EIEConfig(n_pe=n)).cycles for n in (1, 8, 64)]
    assert times[0] > 6 * times[1] > 36 * times[2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_pe": 0}, "n_pe"),
        ({"fifo_depth": 0}, "fifo_depth"),
        ({"clock_hz": -1.0}, "clock_hz"),
        ({"index_bits": 17}, "index_bits"),
        ({"energy": {"mac": 1}}, "EnergyTable"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(DeepShrinkError, match=match):
        EIEConfig(**kwargs)


def test_bad_inputs_are_named(alex7):
    with pytest.raises(DeepShrinkError, match="4096 columns"):
        simulate_layer(alex7, np.ones(100))
    with pytest.raises(DeepShrinkError, match="not both"):
        simulate_layer(alex7, np.ones(4096), act_density=0.5)
    with pytest.raises(DeepShrinkError, match="act_density"):
        simulate_layer(alex7, act_density=1.5)
    with pytest.raises(DeepShrinkError, match="known layers"):
        benchmark_layer("Alex-9")
    with pytest.raises(DeepShrinkError, match="EnergyTable.dram_read_32bit_pj"):
        EnergyTable(dram_read_32bit_pj=float("nan"))
    wide = CompressedTensor.from_dense(torch.arange(1.0, 65537.0).reshape(256, 256))  # 16-bit codes
    with pytest.raises(DeepShrinkError, match="sram_width_bits"):
        simulate_layer(wide, config=EIEConfig(sram_width_bits=16))
    with pytest.raises(DeepShrinkError, match="no compressed tensor named"):
        simulate_network({"fc1.weight": alex7}, act_density={"fc9.weight": 0.5})
    with pytest.raises(UnsupportedLayerError, match="BatchNorm"):
        layer_inputs(nn.Sequential(nn.BatchNorm1d(4)), ["0.weight"], torch.ones(2, 4))


@pytest.fixture(scope="module")
def lenet_on_mnist(data_root):
    """LeNet-300-100 trained briefly on real MNIST, pruned to 8% and shared at 4 bits."""
    from deepshrink.compress.prune import prune_
    from deepshrink.compress.quantize import share_weights_
    from deepshrink.compress.train import TrainConfig, fit
    from deepshrink.data.mnist import load_mnist
    from deepshrink.models import lenet_300_100

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, one thread trains this MLP many times faster
    try:
        torch.manual_seed(0)
        x, y = load_mnist(data_root, "train")
        model = lenet_300_100()
        fit(model, (x[:20000], y[:20000]), TrainConfig(lr=0.1, batch_size=100, progress=False))
        prune_(model, 0.92)
        # retrain with the mask held, at 1/10 of the rate
        fit(model, (x[20000:30000], y[20000:30000]), TrainConfig(lr=0.01, batch_size=100, progress=False))
        share_weights_(model, bits=4)
    finally:
        torch.set_num_threads(threads)
    x_test, y_test = load_mnist(data_root, "test")
    return model, x_test[:200], y_test[:200]


def test_real_mnist_layers_cost_what_their_weights_and_activations_say(lenet_on_mnist):
    from deepshrink.compress.quantize import compressed_tensors

    model, x, y = lenet_on_mnist
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.85  # a real, working compressed model
    tensors = compressed_tensors(model)
    acts = layer_inputs(model, tensors, x)
    net = simulate_network(tensors, acts)
    assert [r.name for r in net.layers] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    for r in net.layers:
        a = acts[r.name]
        weight = tensors[r.name].to_dense().numpy()
        assert r.vectors == 200 and r.active_columns == np.count_nonzero(a)
        # independent count: kept weights in the non-zero input columns, image by image
        assert r.macs == int(((weight != 0).astype(np.int64) @ (a != 0).T.astype(np.int64)).sum())
    # MNIST pixels and ReLU outputs are mostly zero: EIE skips them
    assert net.layers[0].active_columns / (200 * 784) < 0.3
    assert net.layers[1].active_columns / (200 * 300) < 0.8
    assert net.cycles == sum(r.cycles for r in net.layers) > 0
