"""Wrong inputs to the 2D pipelines get a message naming the file and the fix, not an inner error from a later
transform (issue 21, item 13): 3-D / 4-D NIfTI, DICOM, NRRD without 'space directions', class labels that are
not class indices, a missing image."""

from __future__ import annotations

import numpy as np
import pytest

from tpp_monai.data.transforms import ImageFileError, cls_transforms, seg_transforms, tpp_transforms


def _chain_error(exc: BaseException) -> ImageFileError:
    e = exc
    while e is not None and not isinstance(e, ImageFileError):
        e = e.__cause__ or e.__context__
    assert e is not None, f"no ImageFileError in the chain of {exc!r}"
    return e


def _err(transform, entry: dict) -> str:
    with pytest.raises(Exception) as ei:
        transform(entry)
    return str(_chain_error(ei.value))


@pytest.fixture
def files(tmp_path):
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    f = {}
    for name, shape in (("vol3d", (16, 16, 16)), ("vol4d", (16, 16, 16, 2)), ("slice", (16, 16, 1))):
        f[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random(shape, dtype=np.float32), np.eye(4)), str(f[name]))
    f["nrrd"] = tmp_path / "nospace.nrrd"  # a valid NRRD header, no 'space directions'
    f["nrrd"].write_bytes(b"NRRD0004\ntype: float\ndimension: 2\nsizes: 16 16\nencoding: raw\nendian: little\n\n"
                          + rng.random((16, 16), dtype=np.float32).astype("<f4").tobytes())
    f["dicom"] = tmp_path / "scan.dcm"
    _write_dicom(f["dicom"])
    f["png"] = tmp_path / "ok.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(f["png"])
    return f


def _write_dicom(path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path), write_like_original=False)
    assert pydicom.dcmread(str(path)).pixel_array.shape == (16, 16)  # a valid DICOM


@pytest.mark.parametrize("kind", ["vol3d", "vol4d"])
def test_a_volume_given_as_a_2d_image_is_named(files, kind):
    for t in (cls_transforms(image_size=16, num_classes=2), tpp_transforms(image_size=16, augment=False)):
        msg = _err(t, {"image": str(files[kind]), "label": 0})
        assert str(files[kind].name) in msg and "2D pipeline" in msg and "Export 2-D slices" in msg, msg


def test_a_2d_slice_with_a_singleton_axis_is_read(files):
    out = cls_transforms(image_size=16, num_classes=2)({"image": str(files["slice"]), "label": 1})
    assert tuple(out["image"].shape) == (3, 16, 16) and int(out["label"]) == 1


def test_dicom_and_nrrd_without_space_directions_are_named(files):
    t = cls_transforms(image_size=16, num_classes=2)
    msg = _err(t, {"image": str(files["dicom"]), "label": 0})
    assert str(files["dicom"]) in msg and "is a DICOM file" in msg and "Convert it to PNG" in msg
    msg = _err(t, {"image": str(files["nrrd"]), "label": 0})
    assert str(files["nrrd"]) in msg and "'space directions'" in msg and "Re-save it" in msg


@pytest.mark.parametrize("label", ["cat", 7, -1, 1.5, True])
def test_classification_labels_must_be_class_indices(files, label):
    msg = _err(cls_transforms(image_size=16, num_classes=3), {"image": str(files["png"]), "label": label})
    assert str(files["png"]) in msg and f"label {label!r}" in msg and "0..2" in msg


def test_a_missing_image_is_named(tmp_path, files):
    for t, entry in ((cls_transforms(image_size=16, num_classes=2), {"image": str(tmp_path / "gone.png"), "label": 0}),
                     (seg_transforms(image_size=16), {"image": str(files["png"]), "label": str(tmp_path / "m.png")})):
        msg = _err(t, entry)
        assert "does not exist" in msg and ("gone.png" in msg or "m.png" in msg) and "datalist" in msg


def test_an_image_with_nan_pixels_is_named_before_training(tmp_path):
    """A NaN loss cannot say which image caused it; the image check can."""
    import nibabel as nib

    arr = np.ones((16, 16), np.float32)
    arr[3, 4], arr[5, 5] = np.nan, np.inf
    p = tmp_path / "nan_slice.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    for t in (cls_transforms(image_size=16, num_classes=2), tpp_transforms(image_size=16, augment=False)):
        msg = _err(t, {"image": str(p), "label": 0})
        assert "nan_slice.nii.gz" in msg and "2 NaN/Inf value(s)" in msg, msg
