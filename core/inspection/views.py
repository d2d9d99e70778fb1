"""Looking at what the teachers wrote: pick teachers and cases by name, put maps on the case's grid, render a PNG,
export NIfTI, and build napari layers. Used by ``teachcache ls / show / export / view``.

Which copy of a teacher a case is shown with: a teacher cached per fold (``unetr/fold_0`` … ``fold_4``) is shown on
a case by the copy of the fold whose *validation* set holds the case — the one that never trained on it — and a
teacher with one checkpoint for every fold by its ``all_folds`` copy.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import StoreError, TeachCacheError
from core.store.teacher_store import TeacherStore
from core.terms import ATTENTION_KINDS

__all__ = [
    "AXES",
    "case_maps",
    "check_output_path",
    "default_slice",
    "export_nifti",
    "foreground_probability",
    "napari_layers",
    "render_case",
    "resolve_case",
    "resolve_teachers",
    "teachers_for_case",
    "upsample_map",
]

AXES = {"x": 0, "y": 1, "z": 2}
EXPORTS = ("probs", "coarse", "fine")


# --- names ---------------------------------------------------------------------------------------------------------


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items)} in all)" if len(items) > limit else "") if items else "none"


def resolve_case(store: TeacherStore, case_id: str) -> str:
    """``case_id`` if the store holds it complete, else one error naming the cases it does hold."""
    cases = store.case_ids()
    if case_id not in cases:
        raise StoreError(f"{store.location}: no case '{case_id}'; the store holds {_listing(cases)}")
    return case_id


def _validation_fold(store: TeacherStore, case_id: str) -> int | None:
    for k, split in enumerate(store.metadata.get("splits", [])):
        if case_id in split.get("val", []):
            return k
    return None


def teachers_for_case(store: TeacherStore, case_id: str) -> list[str]:
    """One copy of each cached teacher for ``case_id``: its ``fold_<k>`` copy for the fold validating the case (it
    never trained on it), else its ``all_folds`` copy; teachers with neither holding the case are left out."""
    fold = _validation_fold(store, case_id)
    by_name: dict[str, list[str]] = {}
    for key in store.teacher_keys():
        by_name.setdefault(key.split("/")[0], []).append(key)
    chosen = []
    for keys in by_name.values():
        preferred = [k for k in keys if k.endswith(f"/fold_{fold}")] + [
            k for k in keys if k.endswith("/all_folds")
        ]
        for key in preferred:
            if store.has_entry(key, case_id):
                chosen.append(key)
                break
    return chosen


def resolve_teachers(store: TeacherStore, names: list[str] | None, case_id: str | None = None) -> list[str]:
    """Teacher keys from what a user typed: a full key (``unetr/fold_0``) or a name (``unetr``; with a case, the copy
    that did not train on it, else its only copy). ``None`` or empty: every teacher (for the case, if given)."""
    keys = store.teacher_keys()
    if not names:
        return teachers_for_case(store, case_id) if case_id is not None else keys
    resolved = []
    for name in names:
        if name in keys:
            resolved.append(name)
            continue
        copies = [k for k in keys if k.split("/")[0] == name]
        if case_id is not None:
            copies = [k for k in teachers_for_case(store, case_id) if k.split("/")[0] == name] or copies
        if len(copies) == 1:
            resolved.append(copies[0])
        elif copies:
            raise StoreError(
                f"{store.location}: teacher '{name}' is cached once per fold ({_listing(copies)}); name one copy, "
                f"e.g. --teacher {copies[0]}"
            )
        else:
            raise StoreError(f"{store.location}: no teacher '{name}'; the store holds {_listing(keys)}")
    if case_id is not None:
        for key in resolved:
            if not store.has_entry(key, case_id):
                raise StoreError(
                    f"{store.location}: teacher '{key}' has no complete entry for case '{case_id}'; run `make cache`"
                )
    return resolved


def check_output_path(path: Path, suffixes: tuple[str, ...]) -> Path:
    """The output file's folder must exist and its name end in one of ``suffixes``: one error each."""
    if not str(path).endswith(suffixes):
        raise TeachCacheError(f"output {path}: the name must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise TeachCacheError(
            f"output {path}: folder {path.parent} does not exist; create it or choose another -o"
        )
    return path


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename: never a half-written output."""
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an output is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- maps on the case grid -----------------------------------------------------------------------------------------


def upsample_map(amap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A tap-grid map (x, y, z) trilinearly resampled onto the case grid ``shape`` (map voxel ``u`` covers case
    voxels ``[u·s, (u+1)·s)``, as everywhere in TeachCache: ``align_corners=False``)."""
    src = torch.as_tensor(np.asarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(src, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """1 − p(background): the probability of any foreground class, (X, Y, Z)."""
    return 1.0 - probs[0]


def case_maps(store: TeacherStore, case_id: str, teacher: str) -> dict[str, np.ndarray]:
    """One teacher's decoded maps of one case on the case grid: ``probs`` (K, X, Y, Z) and ``coarse``/``fine``
    (X, Y, Z), the attention maps upsampled from their tap grids."""
    shape = store.case_shape(case_id)
    maps = {"probs": store.read_softmax(teacher, case_id)}
    for kind in ATTENTION_KINDS:
        amap, _ = store.read_attention(teacher, case_id, kind)
        maps[kind] = upsample_map(amap, shape)
    return maps


# --- export --------------------------------------------------------------------------------------------------------


def _class_index(store: TeacherStore, cls: str | None, num_classes: int) -> int | None:
    names = list(store.metadata["dataset"]["class_names"])
    if cls is None:
        return 1 if num_classes == 2 else None
    if cls in names:
        return names.index(cls)
    if cls.isdigit() and int(cls) < num_classes:
        return int(cls)
    raise TeachCacheError(
        f"no class '{cls}'; the classes are {', '.join(f'{i} {n}' for i, n in enumerate(names))}"
    )


def _to_original(volume: np.ndarray, attrs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) float maps on the preprocessed grid → the original image's grid (MONAI SpatialResample,
    bilinear), and that grid's affine."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    source = MetaTensor(
        torch.from_numpy(volume), affine=torch.as_tensor(np.asarray(attrs["affine"], np.float64))
    )
    original_affine = np.asarray(attrs["original_affine"], np.float64)
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)(
        source,
        dst_affine=torch.as_tensor(original_affine),
        spatial_size=tuple(int(s) for s in attrs["original_shape"]),
    )
    return np.asarray(out.numpy(), dtype=np.float32), original_affine


def export_nifti(
    store: TeacherStore,
    case_id: str,
    teacher: str,
    what: str,
    out: Path,
    original: bool = False,
    cls: str | None = None,
) -> dict[str, Any]:
    """Write one teacher's map of one case as NIfTI in the case's geometry, to lay over the scan in 3D Slicer or
    ITK-SNAP.

    Args:
        what: ``probs`` (the decoded softmax: the foreground class for a binary task, else every class as a 4th
            dimension, unless ``cls`` picks one), ``coarse`` or ``fine`` (attention maps on the case grid).
        original: resample onto the raw image's grid and affine instead of the preprocessed one.
        cls: a class name or index, for ``probs``.

    Returns:
        What was written: path, shape, affine, class.
    """
    import nibabel as nib

    if what not in EXPORTS:
        raise TeachCacheError(f"--what must be one of {', '.join(EXPORTS)}, got '{what}'")
    check_output_path(out, (".nii", ".nii.gz"))
    attrs = store.case_attrs(case_id)
    shape = store.case_shape(case_id)
    chosen = None
    if what == "probs":
        probs = store.read_softmax(teacher, case_id)
        chosen = _class_index(store, cls, probs.shape[0])
        volume = probs[[chosen]] if chosen is not None else probs
    else:
        if cls is not None:
            raise TeachCacheError("--class applies to --what probs only")
        amap, _ = store.read_attention(teacher, case_id, what)
        volume = upsample_map(amap, shape)[None]
    affine = np.asarray(attrs["affine"], np.float64)
    if original:
        volume, affine = _to_original(np.ascontiguousarray(volume, dtype=np.float32), attrs)
    data = volume[0] if volume.shape[0] == 1 else np.moveaxis(volume, 0, -1)  # NIfTI: classes as the 4th axis
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = f"teachcache {teacher} {what}".encode()[:79]
    _write_atomically(out, lambda tmp: nib.save(image, str(tmp)))
    names = store.metadata["dataset"]["class_names"]
    return {
        "path": str(out),
        "shape": list(data.shape),
        "affine": affine.tolist(),
        "geometry": "original" if original else "preprocessed",
        "class": names[chosen] if chosen is not None else ("all" if what == "probs" else None),
    }


# --- the PNG ---------------------------------------------------------------------------------------------------------


def default_slice(label: np.ndarray, axis: int, fallback: np.ndarray | None = None) -> int:
    """The slice along ``axis`` with the most labelled foreground; else the most ``fallback`` (e.g. the teachers'
    mean foreground probability); else the middle one."""
    others = tuple(a for a in range(3) if a != axis)
    for volume in (label > 0, fallback):
        if volume is not None:
            per_slice = np.asarray(volume, dtype=np.float64).sum(axis=others)
            if per_slice.max() > 0:
                return int(per_slice.argmax())
    return label.shape[axis] // 2


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2-D slice shown with the first remaining axis across and the second up (``imshow(..., origin="lower")``)."""
    return np.take(volume, index, axis=axis).T


def figure_grid(channels: int, teachers: int) -> tuple[int, int]:
    """(rows, columns) of :func:`render_case`'s panels: image channels + label + disagreement on the first row;
    foreground probability, coarse and fine attention per teacher on the next."""
    return 1 + teachers, max(channels + 2, 3)


PANEL_INCHES = 2.6
DPI = 100


def _slice_index(case_id: str, label: np.ndarray, axis: int, index: int | None, fg: list[np.ndarray]) -> int:
    """``index`` checked against the case's slices along ``axis``; ``None``: :func:`default_slice`, falling back on
    the teachers' mean foreground probability."""
    size = label.shape[axis]
    if index is None:
        return default_slice(label, axis, np.mean(fg, axis=0) if fg else None)
    if not 0 <= index < size:
        raise TeachCacheError(
            f"slice {index} is out of range for case '{case_id}': axis {'xyz'[axis]} has {size} slices (0–{size - 1})"
        )
    return index


def _disagreement(probs: list[np.ndarray], label: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: where the teachers' argmax classes differ (none with fewer than two teachers)."""
    argmaxes = [np.argmax(p, axis=0) for p in probs]
    if len(argmaxes) < 2:
        return np.zeros_like(label, bool)
    return np.any([a != argmaxes[0] for a in argmaxes[1:]], axis=0)


@dataclass(frozen=True)
class _SliceView:
    """What every panel of one slice shares: the first image channel under it, the label outlined on it, the pixel
    aspect (the spacing up over the spacing across)."""

    base: np.ndarray
    label: np.ndarray
    aspect: float

    def image(self, ax: Any, title: str, picture: np.ndarray) -> None:
        """A greyscale image channel on its own."""
        ax.imshow(picture, cmap="gray", origin="lower", aspect=self.aspect, interpolation="nearest")
        ax.set_title(title, fontsize=8)

    def panel(
        self, ax: Any, title: str, overlay: np.ndarray | None = None, cmap: str = "magma", vmax: float = 1.0
    ) -> None:
        """``overlay`` (faint values hidden) over the first image channel, with the label's outline."""
        ax.imshow(self.base, cmap="gray", origin="lower", aspect=self.aspect, interpolation="nearest")
        if overlay is not None:
            shown = np.ma.masked_less(overlay, 0.02 * vmax)
            ax.imshow(shown, cmap=cmap, origin="lower", aspect=self.aspect, alpha=0.6, vmin=0, vmax=vmax)
        if self.label.any():
            ax.contour(self.label > 0, levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
        ax.set_title(title, fontsize=8)


def _slice_view(
    store: TeacherStore, case_id: str, image: np.ndarray, label: np.ndarray, axis: int, index: int
) -> _SliceView:
    """Slice ``index`` along ``axis`` of the first image channel (C, X, Y, Z) and the label (X, Y, Z), drawn at the
    case's spacing."""
    spacing = store.case_attrs(case_id).get("spacing", [1.0, 1.0, 1.0])
    across, up = (a for a in range(3) if a != axis)
    aspect = float(spacing[up]) / float(spacing[across])
    return _SliceView(_take(image[0], axis, index), _take(label, axis, index), aspect)


def _draw_case_row(
    row: Any,
    view: _SliceView,
    channel_names: list[str],
    image: np.ndarray,
    label: np.ndarray,
    disagree: np.ndarray,
    axis: int,
    index: int,
) -> None:
    """The first row: each image channel, the label, and where the teachers disagree."""
    for c, name in enumerate(channel_names):
        view.image(row[c], f"{name}", _take(image[c], axis, index))
    lab = view.label
    view.panel(
        row[image.shape[0]],
        "label (cyan outline)",
        np.where(lab > 0, lab.astype(np.float32), 0.0),
        cmap="autumn",
        vmax=max(1.0, float(label.max())),
    )
    view.panel(
        row[image.shape[0] + 1],
        f"teachers disagree ({int(disagree.sum())} voxels)",
        _take(disagree.astype(np.float32), axis, index),
        cmap="Reds",
    )


def _draw_teacher_rows(
    axes: Any,
    view: _SliceView,
    teachers: list[str],
    maps: dict[str, dict[str, np.ndarray]],
    fg: dict[str, np.ndarray],
    axis: int,
    index: int,
) -> None:
    """One row per teacher: its foreground probability, then its coarse and fine attention."""
    for r, t in enumerate(teachers, start=1):
        m = maps[t]
        view.panel(axes[r, 0], f"{t}\np(foreground)", _take(fg[t], axis, index))
        for c, kind in enumerate(ATTENTION_KINDS, start=1):
            sl = _take(m[kind], axis, index)
            view.panel(
                axes[r, c], f"{t}\n{kind} attention", sl, cmap="viridis", vmax=float(max(m[kind].max(), 1e-6))
            )


def render_case(
    store: TeacherStore,
    case_id: str,
    teachers: list[str],
    out: Path,
    axis: int = 2,
    index: int | None = None,
) -> dict[str, Any]:
    """One PNG a person reads at a glance: the image channels, the label, where the teachers disagree, and per
    teacher its foreground probability and coarse and fine attention maps (upsampled to the case grid) over the
    first image channel, with the label's outline on every panel.

    Returns:
        What was drawn: path, axis, slice, teachers, pixel size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_output_path(out, (".png",))
    image = store.read_image(case_id)
    label = store.read_label(case_id)
    maps = {t: case_maps(store, case_id, t) for t in teachers}
    fg = {t: foreground_probability(m["probs"]) for t, m in maps.items()}
    index = _slice_index(case_id, label, axis, index, [fg[t] for t in teachers])
    disagree = _disagreement([maps[t]["probs"] for t in teachers], label)
    view = _slice_view(store, case_id, image, label, axis, index)

    rows, cols = figure_grid(image.shape[0], len(teachers))
    fig, axes = plt.subplots(
        rows, cols, figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI, squeeze=False
    )
    for a in axes.flat:
        a.set_axis_off()
    channel_names = store.metadata["dataset"]["channel_names"]
    _draw_case_row(axes[0], view, channel_names, image, label, disagree, axis, index)
    _draw_teacher_rows(axes, view, teachers, maps, fg, axis, index)
    fig.suptitle(f"{case_id} — slice {'xyz'[axis]} = {index} of {label.shape[axis]}", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.3)
    _write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    plt.close(fig)
    return {
        "path": str(out),
        "case": case_id,
        "axis": "xyz"[axis],
        "slice": index,
        "teachers": teachers,
        "pixels": [round(cols * PANEL_INCHES * DPI), round(rows * PANEL_INCHES * DPI)],
        "disagreeing_voxels": int(disagree.sum()),
    }


# --- napari --------------------------------------------------------------------------------------------------------


def _image_layers(
    store: TeacherStore, case_id: str, spacing: np.ndarray
) -> list[tuple[Any, dict[str, Any], str]]:
    """Each image channel (greyscale, additive) and the label."""
    image = store.lazy(f"cases/{case_id}/image")
    layers: list[tuple[Any, dict[str, Any], str]] = [
        (
            image[c],
            {"name": name, "scale": tuple(spacing), "colormap": "gray", "blending": "additive"},
            "image",
        )
        for c, name in enumerate(store.metadata["dataset"]["channel_names"])
    ]
    layers.append(
        (store.lazy(f"cases/{case_id}/label"), {"name": "label", "scale": tuple(spacing)}, "labels")
    )
    return layers


def _foreground_layer(
    store: TeacherStore, case_id: str, teacher: str, spacing: np.ndarray
) -> tuple[Any, dict[str, Any], str]:
    """One teacher's foreground probability, decoded block by block from its stored softmax."""
    import dask.array as da

    enc = store.entry_encoding(teacher, case_id)
    stored = store.lazy(f"teachers/{teacher}/{case_id}/softmax")
    stored = stored.rechunk({0: stored.shape[0]})  # every class of a voxel in one block: decoding needs them

    def fg_block(block: np.ndarray) -> np.ndarray:
        return foreground_probability(enc.decode(block, 1.0)).astype(np.float32)

    prob = da.map_blocks(fg_block, stored, drop_axis=0, dtype=np.float32)
    kwargs = {
        "name": f"{teacher} p(foreground)",
        "scale": tuple(spacing),
        "colormap": "magma",
        "blending": "additive",
        "contrast_limits": (0.0, 1.0),
        "visible": False,
    }
    return prob, kwargs, "image"


def _attention_layers(
    store: TeacherStore, case_id: str, teacher: str, spacing: np.ndarray
) -> list[tuple[Any, dict[str, Any], str]]:
    """One teacher's coarse and fine attention maps, each voxel drawn over the case voxels it covers."""
    strides = store.entry_attrs(teacher, case_id)
    layers: list[tuple[Any, dict[str, Any], str]] = []
    for kind in ATTENTION_KINDS:
        scale = spacing * np.asarray(strides[f"{kind}_stride"], dtype=np.float64)
        translate = (scale - spacing) / 2.0  # the map voxel's centre over the case voxels it covers
        amap = store.lazy(f"teachers/{teacher}/{case_id}/{kind}").astype(np.float32)
        kwargs = {
            "name": f"{teacher} {kind} attention",
            "scale": tuple(scale),
            "translate": tuple(translate),
            "colormap": "viridis",
            "blending": "additive",
            "visible": False,
        }
        layers.append((amap, kwargs, "image"))
    return layers


def napari_layers(
    store: TeacherStore, case_id: str, teachers: list[str]
) -> list[tuple[Any, dict[str, Any], str]]:
    """napari layer data tuples ``(data, kwargs, "image" | "labels")`` for one case: each image channel, the label,
    and each teacher's foreground probability and attention maps — all lazy dask arrays read from Zarr on demand,
    at their true scale (mm; a tap-grid map is drawn over the case voxels it covers)."""
    spacing = np.asarray(store.case_attrs(case_id).get("spacing", [1.0, 1.0, 1.0]), dtype=np.float64)
    layers = _image_layers(store, case_id, spacing)
    for t in teachers:
        layers.append(_foreground_layer(store, case_id, t, spacing))
        layers += _attention_layers(store, case_id, t, spacing)
    return layers
