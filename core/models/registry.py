"""Model registry: a name maps to a constructor plus the metadata stage 1 and stage 2 rely on.

Each entry declares its two distillation taps by module path: **coarse** (the deepest encoder feature, En) and
**fine** (the second-to-last decoder feature, Dn-1), with their strides relative to the input.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from core.errors import ConfigError

__all__ = ["ModelSpec", "TapSpec", "create_model", "get_spec", "list_models", "register_model"]


@dataclass(frozen=True)
class TapSpec:
    """Where a feature map is captured.

    Attributes:
        module: dotted module path inside the network (``model.get_submodule(module)``).
        capture: ``"output"`` hooks the module's output; ``"input"`` its positional input ``index``.
        index: which element when the captured value is a tuple.
        stride: input voxels per feature voxel along each axis.
    """

    module: str
    stride: int
    capture: Literal["output", "input"] = "output"
    index: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """Registry metadata for one architecture.

    Attributes:
        name: registry name (``arch`` in configs and checkpoints).
        build: ``build(in_channels, out_channels, **args) -> nn.Module``; the network maps (B, C, X, Y, Z) to
            (B, K, X, Y, Z) logits.
        coarse: the En tap.
        fine: the Dn-1 tap.
        size_divisor: every spatial input size must be a multiple of this.
        fixed_input: ``True`` when the network only accepts its construction-time ``img_size`` (UNETR).
        description: one line for ``teachcache models``.
    """

    name: str
    build: Callable[..., nn.Module]
    coarse: TapSpec
    fine: TapSpec
    size_divisor: int
    fixed_input: bool = False
    description: str = ""

    @property
    def taps(self) -> dict[str, TapSpec]:
        return {"coarse": self.coarse, "fine": self.fine}

    def input_size(self, args: dict[str, Any]) -> tuple[int, int, int] | None:
        """The only input size a fixed-input network accepts (its ``img_size``), else ``None``."""
        if not self.fixed_input:
            return None
        size = args.get("img_size", inspect.signature(self.build).parameters["img_size"].default)
        return tuple(size) if isinstance(size, (list, tuple)) else (int(size),) * 3


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; a second registration under the same name is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name``; :class:`ConfigError` lists the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture '{name}'; registered: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(
    name: str, in_channels: int, out_channels: int, args: dict[str, Any] | None = None
) -> nn.Module:
    """Build a registered network.

    Raises:
        ConfigError: unknown name, or arguments the constructor rejects (named in the message).
    """
    spec = get_spec(name)
    try:
        return spec.build(in_channels, out_channels, **(args or {}))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build '{name}' with args {args or {}}: {exc}") from None
