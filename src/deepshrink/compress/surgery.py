"""Network surgery: a smaller dense model without the channels that pruning emptied.

Filter pruning (:func:`deepshrink.compress.groups.prune_groups_` at
``"filter"``) zeroes whole output channels and channel pruning whole input
channels; :func:`shrink` cuts them out of a chain of Linear / Conv (+BatchNorm)
layers, so plain PyTorch runs the model faster with no sparse kernel at all.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from deepshrink.compress.parametrization import bake_
from deepshrink.errors import DeepShrinkError, UnsupportedLayerError

_CHAIN_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    """Linear/conv layers in registration order, each with the batch norms right after it.

    Raises:
        UnsupportedLayerError: a grouped convolution.
    """
    chain: list[tuple[str, nn.Module, list[nn.Module]]] = []
    for name, module in model.named_modules():
        if isinstance(module, _CHAIN_TYPES):
            if not isinstance(module, nn.Linear) and module.groups != 1:
                raise UnsupportedLayerError(
                    f"{name}: shrink() needs groups=1 convolutions, this one has {module.groups}"
                )
            chain.append((name, module, []))
        elif isinstance(module, _NORM_TYPES) and chain:
            chain[-1][2].append(module)
    return chain


def _fan_in(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _fan_out(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _columns(module: nn.Module, channels: int) -> int:
    """Input columns per channel of the previous layer (a flatten makes it the spatial size)."""
    if _fan_in(module) % channels:
        raise DeepShrinkError(
            f"a layer with {_fan_in(module)} inputs cannot follow one with {channels} output channels; "
            f"shrink() handles chains (Sequential-like models, LeNet-5) whose layers run in registration order"
        )
    return _fan_in(module) // channels


def _input_columns(module: nn.Module, keep: torch.Tensor, per_channel: int) -> torch.Tensor:
    """Bool over ``module``'s input dimension: the columns of the kept channels."""
    return keep.repeat_interleave(per_channel) if isinstance(module, nn.Linear) else keep


def _dead_channels(producer: nn.Module, consumer: nn.Module, per_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels with an all-zero filter in ``producer``, and with all-zero inputs in ``consumer``."""
    zero_filter = (producer.weight.detach().reshape(_fan_out(producer), -1) == 0).all(1)
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):
        zero_input = (w.reshape(w.shape[0], -1, per_channel) == 0).all(2).all(0)
    else:
        zero_input = (w.transpose(0, 1).reshape(w.shape[1], -1) == 0).all(1)
    return zero_filter, zero_input


def _capture_inputs(model: nn.Module, modules: list[nn.Module], example: torch.Tensor) -> list[torch.Tensor]:
    """The input each of ``modules`` receives when ``model`` runs on ``example``."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(id(mod), args[0].detach())) for m in modules
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return [seen[id(m)] for m in modules]


def _fold_constant_inputs(consumer: nn.Module, inputs: torch.Tensor, drop: torch.Tensor, name: str) -> None:
    """Add what the dropped input columns contribute to ``consumer``'s bias.

    A pruned filter still adds its bias, so its channel is a constant, not a
    zero; the next layer sees that constant and we keep its effect.

    Raises:
        DeepShrinkError: a dropped input is not constant (the model is not a
            plain chain), or it meets zero padding (its effect is not uniform).
    """
    x = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)[drop]  # (dropped inputs, batch * positions)
    const = x[:, :1]
    if not torch.allclose(x, const.expand_as(x), atol=1e-6):
        raise DeepShrinkError(f"{name}: an input of a removed channel varies; shrink() needs a plain chain")
    if not torch.any(const != 0):
        return
    w = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):
        shift = w[:, drop] @ const[:, 0]
    else:
        if consumer.padding != "valid" if isinstance(consumer.padding, str) else any(consumer.padding):
            raise DeepShrinkError(f"{name}: removing a constant, non-zero input channel of a padded conv is not exact")
        shift = (w[:, drop].reshape(w.shape[0], int(drop.sum()), -1).sum(2) * const[:, 0]).sum(1)
    if consumer.bias is None:
        raise DeepShrinkError(f"{name}: has no bias to absorb a removed channel's constant output")
    consumer.bias.data += shift


def _slice_param(module: nn.Module, name: str, keep: torch.Tensor, dim: int) -> None:
    param = getattr(module, name)
    if param is not None:
        setattr(
            module,
            name,
            nn.Parameter(
                param.detach().index_select(dim, keep.nonzero().reshape(-1)).clone(), requires_grad=param.requires_grad
            ),
        )


def _shrink_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        _slice_param(norm, name, keep, 0)
    idx = keep.nonzero().reshape(-1)
    for name in ("running_mean", "running_var"):
        if getattr(norm, name) is not None:
            setattr(norm, name, getattr(norm, name).index_select(0, idx).clone())
    norm.num_features = int(keep.sum())


def shrink(model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """A smaller dense copy of ``model`` without its removed channels.

    A channel between two consecutive layers goes when the first layer's
    filter for it is all zero (filter pruning) or the second layer's inputs
    from it are all zero (channel pruning). Batch norms in between are cut to
    match; a removed filter's constant output (its bias through the layers
    between) is folded into the next layer's bias. The copy is checked against
    ``model`` on ``example``.

    Args:
        model: a pruned model whose linear/conv layers form a chain in
            registration order (``nn.Sequential``, LeNet-5); it is not changed.
        example: an input batch, used to fold constants and to check the result.
        atol: largest output difference the check accepts.

    Returns:
        A new dense model (parametrizations baked in) computing the same function.

    Raises:
        DeepShrinkError: the layers do not form such a chain, or the check fails.
        UnsupportedLayerError: a grouped convolution.

    Examples:
        >>> from deepshrink.compress.groups import prune_groups_
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        >>> _ = prune_groups_(net, {"0.weight": 0.5}, "filter")
        >>> shrink(net, torch.randn(3, 4))[0].out_features
        3
    """
    small = copy.deepcopy(model).eval()
    bake_(small)
    chain = _chain(small)
    for (_, producer, norms), (consumer_name, consumer, _) in zip(chain, chain[1:]):
        per_channel = _columns(consumer, _fan_out(producer))
        zero_filter, zero_input = _dead_channels(producer, consumer, per_channel)
        drop = zero_filter | zero_input
        if not drop.any():
            continue
        if drop.all():
            raise DeepShrinkError(f"every channel into {consumer_name} is pruned; nothing would be left")
        fold = zero_filter & ~zero_input  # a channel the consumer ignores needs no folding
        if fold.any():
            (inputs,) = _capture_inputs(small, [consumer], example)
            _fold_constant_inputs(consumer, inputs, _input_columns(consumer, fold, per_channel), consumer_name)
        _remove_channels(producer, norms, consumer, ~drop, per_channel)
    _check_same(model, small, example, atol)
    return small


def _remove_channels(
    producer: nn.Module, norms: list[nn.Module], consumer: nn.Module, keep: torch.Tensor, per_channel: int
) -> None:
    """Cut the channels not in ``keep`` out of a producer, its norms and its consumer."""
    _slice_param(producer, "weight", keep, 0)
    _slice_param(producer, "bias", keep, 0)
    for norm in norms:
        _shrink_norm(norm, keep)
    _slice_param(consumer, "weight", _input_columns(consumer, keep, per_channel), 1)
    kept = int(keep.sum())
    if isinstance(producer, nn.Linear):
        producer.out_features = kept
    else:
        producer.out_channels = kept
    if isinstance(consumer, nn.Linear):
        consumer.in_features = kept * per_channel
    else:
        consumer.in_channels = kept


def _check_same(model: nn.Module, small: nn.Module, example: torch.Tensor, atol: float) -> None:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected, got = model(example), small(example)
    model.train(was_training)
    diff = (expected - got).abs().max().item() if expected.numel() else 0.0
    if expected.shape != got.shape or diff > atol:
        raise DeepShrinkError(
            f"the shrunk model differs from the original by {diff:.3g} (> atol={atol}); its layers are not "
            f"a chain in registration order (shrink() handles Sequential-like models and LeNet-5)"
        )
