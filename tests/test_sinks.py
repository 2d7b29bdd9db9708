"""Difspot files and the spot table, checked against hand-computed values."""

from __future__ import annotations

import dataclasses
import os
import re

import h5py
import numpy as np
import pytest

from dctstream.errors import OutputError
from dctstream.sinks import DifspotWriter, SpotTable, difspots, read_spot_table, spot_row
from dctstream.types import Blob

# The box blob: a 3x4x5 (frame, y, x) box at offset (10, 20, 30) without its
# first voxel, value 1 everywhere except 10 at box position (1, 2, 3).
F0, Y0, X0 = 10, 20, 30
SHAPE = (3, 4, 5)
PEAK = (1, 2, 3)
# Weighted sums: a full box of ones sums each coordinate to
# (0+1+2)*20, (0+1+2+3)*15, (0+...+4)*12; the missing voxel is at 0,
# the peak adds 9 times its position; total weight 59 + 9.
WEIGHT = 68.0
CENTROID_REL0 = ((60 + 9 * 1) / WEIGHT, (90 + 9 * 2) / WEIGHT, (120 + 9 * 3) / WEIGHT)


def make_blob(blob_id=12, offset=(F0, Y0, X0), peak_value=10.0) -> Blob:
    f, y, x = np.indices(SHAPE).reshape(3, -1)[:, 1:]  # C order is (frame, y, x) order
    value = np.ones(f.size, np.float32)
    value[(f == PEAK[0]) & (y == PEAK[1]) & (x == PEAK[2])] = peak_value
    peak = tuple(int(o + p) for o, p in zip(offset, PEAK))
    return Blob(
        id=blob_id,
        frame=(f + offset[0]).astype(np.int64),
        y=(y + offset[1]).astype(np.int64),
        x=(x + offset[2]).astype(np.int64),
        value=value,
        max_index=peak,
        max_value=peak_value,
    )


def make_pair_blob(blob_id=3) -> Blob:
    """Two voxels of weights 1 and 3: centroid at 3/4 of the way between them."""
    return Blob(
        id=blob_id,
        frame=np.array([10, 12], np.int64),
        y=np.array([20, 23], np.int64),
        x=np.array([30, 34], np.int64),
        value=np.array([1.0, 3.0], np.float32),
        max_index=(12, 23, 34),
        max_value=3.0,
    )


def read_all(path) -> tuple[dict, dict]:
    """Every dataset of a difspot file, and its root attributes."""
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in f}, dict(f.attrs)


# ---------------------------------------------------------------- spot_row


def test_spot_row_is_zero_based_absolute():
    row = spot_row(make_pair_blob(), psi_deg=45.5)
    assert row == {
        "id": 3, "start_frame": 10, "end_frame": 12, "max_frame": 12, "max_frame_acquired": 12, "area": 2,
        "integral": 4.0, "max_value": 3.0,
        "centroid_x": 33.0, "centroid_y": 22.25, "centroid_frame": 11.5,
        "bbox_x0": 30, "bbox_y0": 20, "bbox_x_size": 5, "bbox_y_size": 4, "touches_mask": 0,
        "centroid_psi_deg": 45.5,
    }
    assert spot_row(dataclasses.replace(make_pair_blob(), touches_mask=True))["touches_mask"] == 1
    assert "centroid_psi_deg" not in spot_row(make_pair_blob())
    assert spot_row(make_pair_blob(), acquired=40)["max_frame_acquired"] == 40  # frames read out of arrival order


# ---------------------------------------------------------------- difspot files


def test_difspot_file_fields(tmp_path):
    path = DifspotWriter(tmp_path).write(make_blob())
    assert path == tmp_path / "difspots" / "000012.h5"
    d, attrs = read_all(path)

    mask = np.ones(SHAPE, np.int8)
    mask[0, 0, 0] = 0
    data = mask.astype(np.float32)
    data[PEAK] = 10.0
    projection = np.full(SHAPE[1:], 3.0, np.float32)
    projection[0, 0] = 2.0
    projection[PEAK[1:]] = 12.0
    np.testing.assert_array_equal(d["Mask"], mask)
    np.testing.assert_array_equal(d["Data"], data)
    np.testing.assert_array_equal(d["DataMasked"], data)
    np.testing.assert_array_equal(d["Projection"], projection)

    assert d["Area"] == 59
    assert d["Integral"] == np.float32(68.0)
    assert d["difspotID"] == 12
    assert d["StartImage"] == 11 and d["EndImage"] == 13
    assert d["BoundingBoxXorigin"] == 31 and d["BoundingBoxYorigin"] == 21
    assert d["BoundingBoxXsize"] == 5 and d["BoundingBoxYsize"] == 4
    np.testing.assert_array_equal(d["BoundingBox"], [[11, 21, 31], [13, 24, 35]])
    np.testing.assert_array_equal(d["BoundingBoxOriginSize"], [[11, 21, 31], [3, 4, 5]])

    cz, cy, cx = (c + 1 for c in CENTROID_REL0)
    assert d["CentroidImage"] == pytest.approx(cz)
    assert d["CentroidY"] == pytest.approx(cy)
    assert d["CentroidX"] == pytest.approx(cx)
    np.testing.assert_allclose(d["CentroidIndex"], [cz, cy, cx])
    assert d["MaxImage"] == 2
    np.testing.assert_array_equal(d["MaxIntensityIndex"], [2, 3, 4])

    assert attrs["interpretation"] == "difspot"
    assert attrs["notation_axes"] == "zyx"
    assert attrs["notation_indexing"] == "starts with 1 (MATLAB)"
    relative = {s.strip() for s in attrs["relative_fields"].split(",")}
    absolute = {s.strip() for s in attrs["absolute_fields"].split(",")}
    assert relative == {"CentroidX", "CentroidY", "CentroidImage", "CentroidIndex",
                        "MaxImage", "MaxIntensityIndex"}
    assert {"StartImage", "EndImage", "BoundingBoxXorigin", "BoundingBoxYorigin",
            "BoundingBox", "BoundingBoxOriginSize"} <= absolute


def test_difspot_file_types_and_compression(tmp_path):
    path = DifspotWriter(tmp_path).write(make_blob())
    expected = {
        "Data": ("float32", (3, 4, 5)), "Mask": ("int8", (3, 4, 5)),
        "DataMasked": ("float32", (3, 4, 5)), "Projection": ("float32", (4, 5)),
        "BoundingBox": ("int64", (2, 3)), "BoundingBoxOriginSize": ("int64", (2, 3)),
        "CentroidIndex": ("float64", (3,)), "MaxIntensityIndex": ("int64", (3,)),
        "Area": ("int64", ()), "Integral": ("float32", ()), "difspotID": ("int64", ()),
        "StartImage": ("int64", ()), "EndImage": ("int64", ()),
        "BoundingBoxXorigin": ("int64", ()), "BoundingBoxYorigin": ("int64", ()),
        "BoundingBoxXsize": ("int64", ()), "BoundingBoxYsize": ("int64", ()),
        "CentroidX": ("float64", ()), "CentroidY": ("float64", ()),
        "CentroidImage": ("float64", ()), "MaxImage": ("int64", ()),
    }
    with h5py.File(path, "r") as f:
        assert set(f) == set(expected)
        for name, (dtype, shape) in expected.items():
            ds = f[name]
            assert (ds.dtype.name, ds.shape) == (dtype, shape), name
            assert ds.compression is None, name  # 60 voxels: not worth a gzip chunk
    # a box of 20 x 20 x 20 voxels: its masked values (32 kB) are compressed, its mask (8 kB) is not, nor are the
    # corrected values of the whole box (noise: gzip does little for them)
    f, y, x = np.indices((20, 20, 20)).reshape(3, -1)
    large = Blob(id=13, frame=f + 5, y=y, x=x, value=np.ones(f.size, np.float32), max_index=(5, 0, 0),
                 max_value=1.0)
    with h5py.File(DifspotWriter(tmp_path).write(large), "r") as h5:
        assert {name for name in h5 if h5[name].compression == "gzip" and h5[name].shuffle} == \
            {"DataMasked"}
        assert np.array_equal(h5["Mask"][()], np.ones((20, 20, 20), np.int8))


def test_difspot_relative_fields_of_pair(tmp_path):
    d, _ = read_all(DifspotWriter(tmp_path).write(make_pair_blob()))
    assert (d["CentroidImage"], d["CentroidY"], d["CentroidX"]) == (2.5, 3.25, 4.0)
    np.testing.assert_array_equal(d["CentroidIndex"], [2.5, 3.25, 4.0])
    assert d["MaxImage"] == 3
    np.testing.assert_array_equal(d["MaxIntensityIndex"], [3, 4, 5])
    assert d["Mask"].sum() == 2 and d["Mask"][0, 0, 0] == 1 and d["Mask"][2, 3, 4] == 1


def test_difspot_with_volume(tmp_path):
    volume = np.full(SHAPE, 0.25, np.float32)
    volume[PEAK] = 7.0
    d, _ = read_all(DifspotWriter(tmp_path).write(make_blob(), volume=volume))
    expected_masked = volume.copy()
    expected_masked[0, 0, 0] = 0.0
    np.testing.assert_array_equal(d["Data"], volume)
    np.testing.assert_array_equal(d["DataMasked"], expected_masked)
    np.testing.assert_array_equal(d["Projection"], expected_masked.sum(axis=0))
    assert d["Integral"] == np.float32(68.0)  # the blob's values, not the volume's


def test_difspot_volume_of_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match=r"\(3, 4, 5\)"):
        DifspotWriter(tmp_path).write(make_blob(), volume=np.zeros((3, 4, 4), np.float32))


def test_difspot_is_complete_before_visible(tmp_path, monkeypatch):
    writer = DifspotWriter(tmp_path)
    real_replace = os.replace
    seen = []

    def checking_replace(src, dst):
        # At rename time the final name does not exist yet and the
        # temporary is a closed, complete file in the same folder.
        assert not os.path.exists(dst)
        assert os.path.dirname(src) == os.path.dirname(dst)
        with h5py.File(src, "r") as f:
            assert f["Data"].shape == SHAPE and "MaxImage" in f
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", checking_replace)
    writer.write(make_blob())
    assert seen == [".000012.h5.tmp"]
    assert os.listdir(writer.folder) == ["000012.h5"]


def test_difspot_replaces_existing_file_atomically(tmp_path):
    writer = DifspotWriter(tmp_path)
    old_path = writer.write(make_blob(peak_value=10.0))
    with h5py.File(old_path, "r") as old:
        new_path = writer.write(make_blob(peak_value=20.0))
        # The open reader keeps the old, whole file: it was renamed over,
        # not rewritten in place.
        assert old["Integral"][()] == np.float32(68.0)
    assert new_path == old_path
    assert read_all(new_path)[0]["Integral"] == np.float32(78.0)
    assert os.listdir(writer.folder) == ["000012.h5"]


def test_difspot_output_dir_is_a_file(tmp_path):
    not_a_dir = tmp_path / "out"
    not_a_dir.write_text("")
    with pytest.raises(OutputError, match=re.escape(str(not_a_dir))) as info:
        DifspotWriter(not_a_dir)
    assert "\n" not in str(info.value)


def test_difspot_file_of_a_shape_written_before_equals_its_own_hdf5_write(tmp_path, monkeypatch):
    # after the first file of a box shape, a file of that shape is that one's bytes with its values put in:
    # the same file as HDF5 writes for it (the datasets' modification times aside)
    writer = DifspotWriter(tmp_path / "run")
    first = make_blob(blob_id=1, peak_value=3.0)  # each field another value than the next one's, but the box
    keep = np.arange(first.frame.size) != 5
    writer.write(dataclasses.replace(first, frame=first.frame[keep], y=first.y[keep], x=first.x[keep],
                                     value=first.value[keep], max_index=(F0 + 2, Y0, X0)))
    through_hdf5 = []
    real_write = difspots._write_h5
    monkeypatch.setattr(difspots, "_write_h5", lambda *a: through_hdf5.append(a) or real_write(*a))
    blob = make_blob(blob_id=40, offset=(100, 200, 300), peak_value=7.5)
    volume = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    path = writer.write(blob, volume=volume)
    assert through_hdf5 == []
    expected = DifspotWriter(tmp_path / "alone").write(blob, volume=volume)
    assert len(through_hdf5) == 1 and path.stat().st_size == expected.stat().st_size
    (d, attrs), (d_expected, attrs_expected) = read_all(path), read_all(expected)
    assert attrs == attrs_expected and d.keys() == d_expected.keys()
    for name in d:
        assert np.asarray(d[name]).dtype == np.asarray(d_expected[name]).dtype, name
        np.testing.assert_array_equal(d[name], d_expected[name], err_msg=name)
    assert d["difspotID"] == 40 and d["StartImage"] == 101 and d["Data"][PEAK] == volume[PEAK]
    with h5py.File(path, "r") as f, h5py.File(expected, "r") as g:
        assert [(n, f[n].id.get_offset(), f[n].chunks) for n in f] == [(n, g[n].id.get_offset(), g[n].chunks)
                                                                     for n in g]


def test_difspot_file_images_are_kept_for_at_most_IMAGES_shapes(tmp_path, monkeypatch):
    monkeypatch.setattr(difspots, "IMAGES", 1)
    writer = DifspotWriter(tmp_path)
    through_hdf5 = []
    real_write = difspots._write_h5
    monkeypatch.setattr(difspots, "_write_h5", lambda *a: through_hdf5.append(a[0].name) or real_write(*a))
    other = make_blob(blob_id=2)
    keep = other.y != other.y.max()  # a box a row shorter: another shape
    other = dataclasses.replace(other, frame=other.frame[keep], y=other.y[keep], x=other.x[keep],
                                value=other.value[keep])
    for i, blob in enumerate([make_blob(blob_id=1), other, make_blob(blob_id=3), other]):
        writer.write(dataclasses.replace(blob, id=10 + i))
    # the first shape's image is kept, the second shape finds no room: its files go through HDF5 each time
    assert through_hdf5 == ["000010.h5", "000011.h5", "000013.h5"]
    for i in range(4):
        assert read_all(writer.folder / f"{10 + i:06d}.h5")[0]["difspotID"] == 10 + i


@pytest.mark.parametrize("written_before", [False, True])
def test_difspot_folder_gone_during_run(tmp_path, written_before):
    writer = DifspotWriter(tmp_path)
    if written_before:  # two files of the same shape: the next one is copied from the first
        for i in (1, 2):
            os.remove(writer.write(make_blob(blob_id=i)))
    writer.folder.rmdir()
    writer.folder.write_text("")  # the folder is now a file: nothing can go in it
    with pytest.raises(OutputError, match=re.escape(str(writer.folder))) as info:
        writer.write(make_blob())
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- spot table


def test_spot_table_round_trip(tmp_path):
    table = SpotTable(tmp_path, {"config": "a: 1\nb: [2, 3]\n", "version": "0.1.0",
                                 "source": "scan.h5", "n_frames": 3600})
    blobs = [make_blob(blob_id=0), make_pair_blob(blob_id=1),
             make_blob(blob_id=2, offset=(100, 200, 300))]
    for blob in blobs:
        table.add(blob)
    assert len(table) == 3
    assert table.rows == [spot_row(blob) for blob in blobs]
    table.close()

    columns = read_spot_table(tmp_path / "spots.h5")
    assert list(columns) == [
        "id", "start_frame", "end_frame", "max_frame", "max_frame_acquired", "area", "integral", "max_value",
        "centroid_x", "centroid_y", "centroid_frame",
        "bbox_x0", "bbox_y0", "bbox_x_size", "bbox_y_size", "touches_mask",
    ]
    np.testing.assert_array_equal(columns["id"], [0, 1, 2])
    np.testing.assert_array_equal(columns["start_frame"], [10, 10, 100])
    np.testing.assert_array_equal(columns["end_frame"], [12, 12, 102])
    np.testing.assert_array_equal(columns["max_frame"], [11, 12, 101])
    np.testing.assert_array_equal(columns["area"], [59, 2, 59])
    np.testing.assert_array_equal(columns["integral"], [68.0, 4.0, 68.0])
    np.testing.assert_array_equal(columns["max_value"], [10.0, 3.0, 10.0])
    np.testing.assert_allclose(columns["centroid_frame"],
                               [10 + CENTROID_REL0[0], 11.5, 100 + CENTROID_REL0[0]])
    np.testing.assert_allclose(columns["centroid_y"],
                               [20 + CENTROID_REL0[1], 22.25, 200 + CENTROID_REL0[1]])
    np.testing.assert_allclose(columns["centroid_x"],
                               [30 + CENTROID_REL0[2], 33.0, 300 + CENTROID_REL0[2]])
    np.testing.assert_array_equal(columns["bbox_x0"], [30, 30, 300])
    np.testing.assert_array_equal(columns["bbox_y0"], [20, 20, 200])
    np.testing.assert_array_equal(columns["bbox_x_size"], [5, 5, 5])
    np.testing.assert_array_equal(columns["bbox_y_size"], [4, 4, 4])
    for name, values in columns.items():
        assert values.dtype == (np.float64 if name in {"integral", "max_value"}
                                or name.startswith("centroid") else np.int64), name

    with h5py.File(tmp_path / "spots.h5", "r") as f:
        attrs = f["spots"].attrs
        assert attrs["config"] == "a: 1\nb: [2, 3]\n"
        assert attrs["version"] == "0.1.0" and attrs["source"] == "scan.h5"
        assert attrs["n_frames"] == 3600 and attrs["n_spots"] == 3
        assert [line.split(":")[0] for line in attrs["columns"].splitlines()] == list(columns)


def test_spot_table_psi_column(tmp_path):
    table = SpotTable(tmp_path, {})
    table.add(make_blob(blob_id=0), psi_deg=0.25)
    table.add(make_pair_blob(blob_id=1), psi_deg=359.5)
    table.flush()
    columns = read_spot_table(tmp_path / "spots.h5")
    assert list(columns)[-1] == "centroid_psi_deg"
    np.testing.assert_array_equal(columns["centroid_psi_deg"], [0.25, 359.5])
    assert table.rows[1]["centroid_psi_deg"] == 359.5


@pytest.mark.parametrize("first_psi, second_psi", [(None, 1.0), (1.0, None)])
def test_spot_table_psi_on_all_rows_or_none(tmp_path, first_psi, second_psi):
    table = SpotTable(tmp_path, {})
    table.add(make_blob(blob_id=0), psi_deg=first_psi)
    with pytest.raises(ValueError, match="psi"):
        table.add(make_pair_blob(blob_id=1), psi_deg=second_psi)
    assert len(table) == 1


def test_empty_spot_table(tmp_path):
    SpotTable(tmp_path, {"version": "0.1.0"}).close()
    columns = read_spot_table(tmp_path / "spots.h5")
    assert len(columns) == 16 and "centroid_psi_deg" not in columns
    assert all(values.shape == (0,) for values in columns.values())
    with h5py.File(tmp_path / "spots.h5", "r") as f:
        assert f["spots"].attrs["n_spots"] == 0


def test_spot_table_grows_past_its_buffer(tmp_path):
    table = SpotTable(tmp_path, {})
    for i in range(2500):
        table.add(make_pair_blob(blob_id=i), psi_deg=i / 10)
    table.flush()
    columns = read_spot_table(tmp_path / "spots.h5")
    np.testing.assert_array_equal(columns["id"], np.arange(2500))
    np.testing.assert_array_equal(columns["centroid_psi_deg"], np.arange(2500) / 10)


@pytest.mark.parametrize("swmr", [False, True])
def test_reader_sees_complete_table_after_each_flush(tmp_path, swmr):
    table = SpotTable(tmp_path, {"version": "0.1.0"})
    path = tmp_path / "spots.h5"
    table.flush()
    held = h5py.File(path, "r", swmr=swmr)  # a reader that stays open across flushes
    expected = 0
    for n_added in (1, 3, 0, 5):
        for _ in range(n_added):
            table.add(make_pair_blob(blob_id=expected))
            expected += 1
        table.flush()
        with h5py.File(path, "r", swmr=swmr) as f:
            group = f["spots"]
            assert group.attrs["n_spots"] == expected
            assert {group[name].shape for name in group} == {(expected,)}
            np.testing.assert_array_equal(group["id"][()], np.arange(expected))
    assert held["spots"].attrs["n_spots"] == 0 and held["spots/id"].shape == (0,)
    held.close()
    assert os.listdir(tmp_path) == ["spots.h5"]


def test_flush_without_changes_does_not_rewrite(tmp_path):
    table = SpotTable(tmp_path, {})
    table.add(make_blob())
    table.flush()
    inode = os.stat(tmp_path / "spots.h5").st_ino
    table.flush()
    table.close()
    # A rewrite would have renamed a new file (a new inode, since the old one
    # is still linked while the new one is written) over the old one.
    assert os.stat(tmp_path / "spots.h5").st_ino == inode
    table.add(make_pair_blob(blob_id=1))
    table.flush()
    assert os.stat(tmp_path / "spots.h5").st_ino != inode


def test_spot_table_output_dir_is_a_file(tmp_path):
    not_a_dir = tmp_path / "out"
    not_a_dir.write_text("")
    with pytest.raises(OutputError, match=re.escape(str(not_a_dir))) as info:
        SpotTable(not_a_dir, {})
    assert "\n" not in str(info.value)


def test_spot_table_rejects_unstorable_attribute(tmp_path):
    with pytest.raises(TypeError, match="'config'"):
        SpotTable(tmp_path, {"config": None})


@pytest.mark.parametrize("values", [[-1.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
def test_a_blob_whose_measured_values_sum_to_zero_or_less_is_written_at_its_voxels_mean(tmp_path, values):
    # found on the median-filtered frames, measured on the unfiltered ones: a one-frame speck of noise can sum
    # to 0 or below there (a run stopped on "cannot convert float NaN to integer" at its psi)
    blob = Blob(id=3, frame=np.array([4, 4, 5]), y=np.array([10, 11, 10]), x=np.array([7, 7, 9]),
                value=np.array(values, np.float32), max_index=(4, 10, 7), max_value=0.5,
                moments=(float(sum(values)), 0.0, 0.0, 0.0))
    assert np.allclose(blob.centroid, (13 / 3, 31 / 3, 23 / 3))
    row = SpotTable(tmp_path, {}).add(blob, psi_deg=1.0)
    assert np.isfinite([row["centroid_x"], row["centroid_y"], row["centroid_frame"]]).all()
