"""Forward hooks that capture a network's tap features, resolved strictly by module path and always removed."""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

from core.models.registry import TapSpec

__all__ = ["TapRecorder", "attention_map"]


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Channel-aggregated activation map of attention transfer (Zagoruyko & Komodakis, 2017): ``mean_c |F|^p``.

    Args:
        features: (B, C, X, Y, Z).
        p: the power.

    Returns:
        (B, 1, X, Y, Z), unnormalised; losses normalise it over the region they compare.
    """
    return features.abs().float().pow(p).mean(dim=1, keepdim=True)


class TapRecorder:
    """Capture tap features of ``model`` during forward passes.

    Use as a context manager; after each forward pass :attr:`features` maps tap name to its tensor,
    (B, C, x, y, z). Hooks are removed on exit, even after an error.

    Args:
        model: the network.
        taps: name → :class:`TapSpec`.

    Raises:
        KeyError: a tap's module path does not exist in ``model`` (the message lists the top-level modules).
    """

    def __init__(self, model: nn.Module, taps: dict[str, TapSpec]):
        self.model = model
        self.taps = dict(taps)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _resolve(self, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            children = ", ".join(n for n, _ in self.model.named_children())
            raise KeyError(
                f"tap module '{path}' not found in {type(self.model).__name__} (top-level modules: {children})"
            ) from None

    def __enter__(self) -> TapRecorder:
        modules = {name: self._resolve(spec.module) for name, spec in self.taps.items()}  # resolve all first
        for name, spec in self.taps.items():
            if spec.capture == "output":
                hook = self._output_hook(name, spec.index)
                self._handles.append(modules[name].register_forward_hook(hook))
            else:
                hook = self._input_hook(name, spec.index)
                self._handles.append(modules[name].register_forward_pre_hook(hook))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _store(self, name: str, value: object, index: int) -> None:
        if isinstance(value, (tuple, list)):
            value = value[index]
        if not isinstance(value, torch.Tensor) or value.ndim != 5:
            raise RuntimeError(
                f"tap '{name}' captured {type(value).__name__}, expected a (B, C, X, Y, Z) tensor"
            )
        self.features[name] = value

    def _output_hook(self, name: str, index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            self._store(name, output, index)

        return hook

    def _input_hook(self, name: str, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._store(name, args, index)

        return hook
