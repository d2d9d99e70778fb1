"""Data: the nnU-Net raw layout, the synthetic demo dataset, preprocessing, splits and training patches."""

from __future__ import annotations
