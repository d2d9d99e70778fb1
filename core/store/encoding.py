"""Encodings of a teacher's softmax for the store, each able to re-temper: decode at any temperature T.

Every encoding maps float32 logits (K, X, Y, Z) to an array to store plus JSON attributes, and decodes back to
probabilities at temperature T. ``make bench-store`` measures each on real teacher outputs (bytes per voxel
after compression, KL to the float32 softmax at T = 1, 2, 4, write/read speed); the store uses
:data:`DEFAULT_ENCODING`, chosen from those numbers (``docs/store-format.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "MARGIN_REFERENCES",
    "SoftmaxEncoding",
    "get_encoding",
    "kl_per_voxel",
    "softmax",
]

MARGIN_REFERENCES = ("max", "background")


def softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = 0) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def kl_per_voxel(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over voxels of KL(p ‖ q) in nats; p, q are (K, ...) distributions."""
    p = p.astype(np.float64)
    q = q.astype(np.float64)
    return float((p * (np.log(np.maximum(p, eps)) - np.log(np.maximum(q, eps)))).sum(axis=0).mean())


@dataclass(frozen=True)
class SoftmaxEncoding:
    """One way of storing a teacher's class distribution.

    Attributes:
        name: the value of the ``softmax_encoding`` attribute.
        kind: ``"logprob"`` (K channels of log-probabilities), ``"margin"`` (K-1 channels of log-probability
            margins within ±``clip``, stored linearly — see ``reference``), ``"margin-asinh"`` (the same margins
            companded: ``v = round(a · asinh(m / b))``) or ``"prob"`` (K channels of probabilities).
        dtype: stored dtype.
        clip: margin range for the margin kinds.
        asinh_a: companding gain a (levels per unit of asinh).
        asinh_b: companding knee b in nats: steps are about b/a nats near 0 and grow with |m|, where the
            distribution is saturated and a quantisation error costs little KL.
        delta: store with a per-chunk delta filter (numcodecs ``Delta``): margins are smooth, so differences
            of neighbours compress better.
        reference: what margins are taken against (margin kinds). ``"max"`` (format ≥ 1.3): against the
            voxel's most likely class — channel k−1 holds ``m_k = z_k − max z ≤ 0`` for each foreground class k,
            except that the most likely class's own channel, when it is a foreground class, holds
            ``max z − z_0 ≥ 0`` (background's margin, sign-flipped): a positive value marks the reference. Every
            class within ``clip`` of the top keeps its order and its margins exactly, and the classes that matter
            (near the top) sit where quantisation is finest. For two classes this is bit-identical to
            ``"background"``. ``"background"`` (format ≤ 1.2): ``m_k = z_k − z_0`` clipped one by one, which
            loses the order of foreground classes far above background; read for old stores only.
    """

    name: str
    kind: str
    dtype: str
    clip: float = 0.0
    asinh_a: float = 0.0
    asinh_b: float = 0.0
    delta: bool = False
    reference: str = "max"

    def __post_init__(self) -> None:
        if self.reference not in MARGIN_REFERENCES:
            raise ValueError(f"margin reference must be one of {MARGIN_REFERENCES}, got {self.reference!r}")

    def zarr_filters(self) -> list[Any]:
        """Array-to-array filters to store the encoded array with."""
        if not self.delta:
            return []
        import warnings

        with warnings.catch_warnings():  # numcodecs flags its zarr3 wrappers as experimental
            warnings.simplefilter("ignore")
            from numcodecs.zarr3 import Delta

            return [Delta(dtype=np.dtype(self.dtype).str)]

    @property
    def scale(self) -> float:
        """Stored units per nat (quantised kinds)."""
        if self.kind == "margin" and np.dtype(self.dtype).kind in "iu":
            levels = np.iinfo(self.dtype).max - np.iinfo(self.dtype).min
            return levels / (2.0 * self.clip)
        if self.kind == "prob" and np.dtype(self.dtype).kind in "iu":
            return float(np.iinfo(self.dtype).max)
        return 1.0

    def channels(self, num_classes: int) -> int:
        return num_classes - 1 if self.kind.startswith("margin") else num_classes

    def encode(self, logits: np.ndarray) -> np.ndarray:
        """(K, X, Y, Z) float32 logits → the array to store."""
        logits = logits.astype(np.float32)
        if self.kind == "logprob":
            return log_softmax(logits).astype(self.dtype)
        if self.kind == "prob":
            p = softmax(logits)
            if np.dtype(self.dtype).kind in "iu":
                return np.rint(p * self.scale).astype(self.dtype)
            return p.astype(self.dtype)
        margin = self._margins(logits)
        if self.kind == "margin-asinh":
            info = np.iinfo(self.dtype)
            return np.clip(
                np.rint(self.asinh_a * np.arcsinh(margin / self.asinh_b)), info.min, info.max
            ).astype(self.dtype)
        if np.dtype(self.dtype).kind in "iu":
            lo = np.iinfo(self.dtype).min
            return np.rint((margin + self.clip) * self.scale + lo).astype(self.dtype)
        return margin.astype(self.dtype)

    def _margins(self, logits: np.ndarray) -> np.ndarray:
        """(K, ...) logits → (K-1, ...) margins in [−clip, clip] against ``reference``."""
        if self.reference == "background":
            return np.clip(logits[1:] - logits[:1], -self.clip, self.clip)
        top = logits.argmax(axis=0)
        below = np.maximum(logits - logits.max(axis=0, keepdims=True), -self.clip)  # ≤ 0; 0 at the top class
        margin = below[1:]
        for k in range(1, logits.shape[0]):  # the top class's channel carries background's margin, flipped
            margin[k - 1] = np.where(top == k, -below[0], margin[k - 1])
        return margin

    def _scores_from_margins(self, margin: np.ndarray) -> np.ndarray:
        """(K-1, ...) decoded margins → (K, ...) scores (logits up to a per-voxel constant)."""
        if self.reference == "background":
            return np.concatenate([np.zeros_like(margin[:1]), margin], axis=0)
        flipped = margin.max(axis=0, keepdims=True)  # > 0 only in the top foreground class's channel
        background = -np.maximum(flipped, 0.0)
        return np.concatenate([background, np.where(margin > 0, 0.0, margin)], axis=0).astype(np.float32)

    def log_scores(self, stored: np.ndarray) -> np.ndarray:
        """Stored array → (K, ...) float32 scores equal to the logits up to a per-voxel constant."""
        data = stored.astype(np.float32)
        if self.kind == "logprob":
            return data
        if self.kind == "prob":
            p = data / self.scale if np.dtype(self.dtype).kind in "iu" else data
            return np.log(np.maximum(p, 1e-12))
        if self.kind == "margin-asinh":
            data = self.asinh_b * np.sinh(data / self.asinh_a)
        elif np.dtype(self.dtype).kind in "iu":
            data = (data - np.iinfo(self.dtype).min) / self.scale - self.clip
        return self._scores_from_margins(data)

    def decode(self, stored: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Stored array → (K, ...) float32 probabilities at ``temperature``: softmax(scores / T)."""
        return softmax(self.log_scores(stored) / temperature).astype(np.float32)

    def attrs(self) -> dict[str, Any]:
        """What a plain-zarr reader needs to decode the array (stored on the array)."""
        attrs = {"softmax_encoding": self.name, "kind": self.kind, "clip": self.clip, "scale": self.scale}
        if self.kind.startswith("margin"):
            attrs["margin_reference"] = self.reference
        if self.kind == "margin-asinh":
            attrs.update({"asinh_a": self.asinh_a, "asinh_b": self.asinh_b})
        return attrs


ENCODINGS: dict[str, SoftmaxEncoding] = {
    e.name: e
    for e in (
        SoftmaxEncoding("prob-uint8", "prob", "uint8"),
        SoftmaxEncoding("prob-float16", "prob", "float16"),
        SoftmaxEncoding("logprob-float16", "logprob", "float16"),
        SoftmaxEncoding("margin-float16", "margin", "float16", clip=30.0),
        SoftmaxEncoding("margin-int16-c20", "margin", "int16", clip=20.0),
        SoftmaxEncoding("margin-uint8-c12", "margin", "uint8", clip=12.0),
        SoftmaxEncoding("margin-uint8-c16", "margin", "uint8", clip=16.0),
        SoftmaxEncoding("margin-asinh-int8", "margin-asinh", "int8", clip=30.0, asinh_a=16.0, asinh_b=4.0),
        SoftmaxEncoding(
            "margin-asinh-int8-delta",
            "margin-asinh",
            "int8",
            clip=30.0,
            asinh_a=18.0,
            asinh_b=4.0,
            delta=True,
        ),
    )
}
DEFAULT_ENCODING = "margin-asinh-int8-delta"


def get_encoding(name: str, reference: str = "max") -> SoftmaxEncoding:
    """The encoding called ``name``; margin kinds taken against ``reference`` (``"background"``: stores ≤ 1.2)."""
    try:
        enc = ENCODINGS[name]
    except KeyError:
        raise ValueError(f"unknown softmax encoding '{name}'; known: {', '.join(ENCODINGS)}") from None
    return enc if reference == enc.reference else replace(enc, reference=reference)
