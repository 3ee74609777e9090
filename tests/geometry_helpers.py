"""Geometries made with nibabel (voxel reorders) and scipy (reslicing) for the input tests: never with msxai's
own pre-processing, which they test."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage


def save_nifti(path, array, affine, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def reorder(array, affine, axcodes):
    """``array``/``affine`` in another voxel order (nibabel only): the same voxels at the same world positions."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.axcodes2ornt(axcodes))
    out = nib.orientations.apply_orientation(array, ornt)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)


def to_reference_order(array, affine, reference_affine):
    """``array`` (on ``affine``) in the voxel order of ``reference_affine`` (same grid up to a reorder)."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                           nib.orientations.io_orientation(reference_affine))
    out = nib.orientations.apply_orientation(array, ornt)
    np.testing.assert_allclose(affine @ nib.orientations.inv_ornt_aff(ornt, array.shape), reference_affine, atol=1e-4)
    return np.ascontiguousarray(out)


def reslice(src, src_affine, dst_affine, dst_shape, order, slab_mm=None):
    """scipy reslicing of ``src`` onto (``dst_affine``, ``dst_shape``); ``slab_mm`` averages the source over the
    thickness of the destination's slices first (a 2-D acquisition's slice profile)."""
    if slab_mm:
        normal = dst_affine[:3, 2] / np.linalg.norm(dst_affine[:3, 2])
        src_axis = int(np.argmax(np.abs(np.linalg.inv(src_affine[:3, :3]) @ normal)))
        src = ndimage.uniform_filter1d(src, size=int(round(slab_mm)), axis=src_axis)
    m = np.linalg.inv(src_affine) @ dst_affine
    return ndimage.affine_transform(src, m[:3, :3], m[:3, 3], output_shape=tuple(dst_shape), order=order,
                                    mode="constant", cval=0.0)


def oblique_grid(affine, shape, degrees=10.0, spacing=(0.9, 0.9, 3.0)):
    """A grid over the same field of view, turned by ``degrees`` about the left-right axis, with ``spacing``."""
    t = np.radians(degrees)
    rot = np.eye(4)
    rot[1:3, 1:3] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    lin = rot[:3, :3] @ affine[:3, :3] @ np.diag(spacing)
    extent = (np.array(shape) - 1) * np.array([1.0, 1.0, 1.0])
    new_shape = (np.floor(extent / np.array(spacing) * 0.92) + 1).astype(int)  # inside the turned box
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = centre - lin @ ((new_shape - 1) / 2)
    return out, tuple(int(s) for s in new_shape)
