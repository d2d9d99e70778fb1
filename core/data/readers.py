"""Reading image files of any layout: NIfTI with nibabel (MONAI's ``NibabelReader``), MetaImage (``.mha``/``.mhd``, as
PI-CAI ships) with SimpleITK through a MONAI ``ImageReader`` — the optional ``teachcache[mha]`` extra.

Every reader gives arrays in (x, y, z) voxel order with a RAS voxel-to-world affine, as nibabel does: ITK's physical
space is LPS, so its affine is flipped in x and y (MONAI's ``ITKReader`` does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data.image_reader import ImageReader, _copy_compatible_dict, _stack_images
from monai.data.utils import is_supported_format
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from core.errors import DatasetError

__all__ = ["ITK_SUFFIXES", "SimpleITKReader", "read_header", "read_volume"]

ITK_SUFFIXES = (".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sitk() -> Any:
    try:
        import SimpleITK
    except ImportError:
        raise DatasetError(
            "reading .mha/.mhd images (PI-CAI) needs SimpleITK, which is not installed: "
            "pip install 'teachcache[mha]' (or pip install SimpleITK)"
        ) from None
    return SimpleITK


def is_itk_file(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def _itk_affine(size_spacing_origin_direction: tuple[Any, Any, Any, Any]) -> np.ndarray:
    """RAS voxel-to-world matrix of an ITK image from its spacing, origin and direction (LPS)."""
    _, spacing, origin, direction = size_spacing_origin_direction
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(
        np.asarray(spacing, np.float64)
    )
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return _LPS_TO_RAS @ affine


class SimpleITKReader(ImageReader):
    """A MONAI image reader for MetaImage files via SimpleITK: (x, y, z) arrays, RAS affines."""

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return is_supported_format(filename, ["mha", "mhd"])

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> Any:
        sitk = _sitk()
        images = [sitk.ReadImage(str(p)) for p in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict]:
        sitk = _sitk()
        arrays, meta = [], {}
        for image in (
            img if isinstance(img, list | tuple) else [img]
        ):  # an ITK image is itself iterable (pixels)
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                raise DatasetError(f"expected one 3-D volume, got {image.GetDimension()}-D with "
                                   f"{image.GetNumberOfComponentsPerPixel()} component(s)")  # fmt: skip
            array = sitk.GetArrayFromImage(image).T  # ITK arrays are (z, y, x)
            affine = _itk_affine(
                (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
            )
            header = {
                MetaKeys.AFFINE: affine,
                MetaKeys.ORIGINAL_AFFINE: affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            }
            arrays.append(array)
            _copy_compatible_dict(header, meta)
        return _stack_images(arrays, meta), meta


def read_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """A file's full shape and RAS affine from its header alone (no voxels read)."""
    try:
        return _read_header(path)
    except DatasetError:
        raise
    except Exception as exc:  # nibabel and ITK raise many types for a corrupt or foreign file
        raise DatasetError(f"cannot read {path} ({exc}); replace the file with a valid image") from None


def _read_header(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    if is_itk_file(path):
        sitk = _sitk()
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if reader.GetDimension() != 3:
            raise DatasetError(
                f"{path} is a {reader.GetDimension()}-D image; every file must be one 3-D volume"
            )
        info = (reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
        shape = tuple(int(s) for s in reader.GetSize())
        if reader.GetNumberOfComponents() > 1:
            shape = (*shape, int(reader.GetNumberOfComponents()))
        return shape, _itk_affine(info)
    import nibabel as nib

    img = nib.load(str(path))
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def read_volume(path: Path) -> np.ndarray:
    """A file's voxels, (x, y, z[, c]), as stored."""
    if is_itk_file(path):
        sitk = _sitk()
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, c)
        return array.T if image.GetNumberOfComponentsPerPixel() == 1 else np.transpose(array, (2, 1, 0, 3))
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)
