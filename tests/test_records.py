"""Record store: numpy-only round trip, torn rows, truncation on resume, format errors."""

import json

import numpy as np
import pytest
import torch

from symtools.errors import SymtoolsError
from symtools.numeric.records import RecordWriter, list_streams, read_meta, read_stream


def _rows(steps, width=3):
    return np.array([[s] + [s * 10.0 + j for j in range(1, width)] for s in steps], dtype=np.float64)


def test_round_trip_is_readable_with_numpy_alone(tmp_path):
    with RecordWriter(tmp_path) as w:
        st = w.stream("layers", ["step", "a", "b"], "per-layer figures", meta={"layers": ["features.0", "features.3"]})
        st.append([0, 1.5, -2.0])                              # one row, list
        st.append(np.array([[1, 2.0, 3.0], [2, 4.0, 5.0]]))    # a block
        st.append(torch.tensor([3, 6.0, 7.0], dtype=torch.float32))  # a tensor
        w.flush()
    cols, arr = read_stream(tmp_path, "layers")
    assert cols == ["step", "a", "b"]
    np.testing.assert_array_equal(arr, [[0, 1.5, -2.0], [1, 2, 3], [2, 4, 5], [3, 6, 7]])
    # the documented numpy-only recipe gives the same array
    spec = json.load(open(tmp_path / "layers.json"))
    raw = np.fromfile(tmp_path / "layers.f64", "<f8").reshape(-1, spec["width"])
    np.testing.assert_array_equal(raw, arr)
    assert spec["columns"] == cols and spec["dtype"] == "<f8" and spec["description"] == "per-layer figures"
    assert read_meta(tmp_path, "layers")["meta"] == {"layers": ["features.0", "features.3"]}
    assert list_streams(tmp_path) == ["layers"]
    # float64 values survive exactly (no text round trip)
    with RecordWriter(tmp_path) as w:
        w.stream("layers", ["step", "a", "b"]).append([4, np.pi, np.nextafter(1.0, 2.0)])
    assert read_stream(tmp_path, "layers")[1][-1, 1] == np.pi
    assert read_stream(tmp_path, "layers", mmap=True)[1][-1, 2] == np.nextafter(1.0, 2.0)


def test_partial_trailing_row_is_ignored_by_reader_and_cut_by_writer(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.stream("s", ["step", "x", "y"]).append(_rows(range(5)))
    with open(tmp_path / "s.f64", "ab") as fh:  # a row torn by a kill: 2 of its 3 values, plus 3 stray bytes
        fh.write(np.array([5.0, 51.0]).tobytes() + b"\x01\x02\x03")
    assert read_stream(tmp_path, "s")[1].shape == (5, 3)
    w = RecordWriter(tmp_path)  # reopening cuts back to the last complete row
    assert (tmp_path / "s.f64").stat().st_size == 5 * 3 * 8
    w.stream("s", ["step", "x", "y"]).append(_rows([5]))
    w.close()
    np.testing.assert_array_equal(read_stream(tmp_path, "s")[1], _rows(range(6)))


def test_truncate_to_step_restores_records_as_at_a_checkpoint(tmp_path):
    with RecordWriter(tmp_path) as w:
        a = w.stream("every", ["step", "x", "y"])
        b = w.stream("stride", ["step", "v"])
        for s in range(11):
            a.append(_rows([s]))
            a.append(_rows([s]))  # several rows per step are fine
            if s % 4 == 0:
                b.append([s, -s])
    w = RecordWriter(tmp_path)
    kept = w.truncate_to_step(6)
    assert kept == {"every": 14, "stride": 2}
    st = w.stream("every", ["step", "x", "y"])
    st.append(_rows([7]))  # appending continues after the kept rows
    w.close()
    steps = read_stream(tmp_path, "every")[1][:, 0]
    np.testing.assert_array_equal(steps, np.repeat(np.arange(7), 2).tolist() + [7])
    np.testing.assert_array_equal(read_stream(tmp_path, "stride")[1], [[0, 0], [4, -4]])
    with RecordWriter(tmp_path) as w:  # negative control: a step past the end keeps everything
        assert w.truncate_to_step(100) == {"every": 15, "stride": 2}
        assert w.truncate_to_step(-np.inf) == {"every": 0, "stride": 0}


def test_bad_use_is_a_clear_error(tmp_path):
    w = RecordWriter(tmp_path)
    with pytest.raises(SymtoolsError, match="first column .* must be 'step'"):
        w.stream("t", ["loss", "step"])
    with pytest.raises(SymtoolsError, match="bad record stream name"):
        w.stream("../x", ["step"])
    st = w.stream("t", ["step", "loss"])
    with pytest.raises(SymtoolsError, match="has 2 columns"):
        st.append([1, 2, 3])
    w.close()
    with pytest.raises(SymtoolsError, match="has columns"):
        RecordWriter(tmp_path).stream("t", ["step", "other"])
    with pytest.raises(SymtoolsError, match="no record stream"):
        read_stream(tmp_path, "missing")
    assert read_stream(tmp_path, "t")[1].shape == (0, 2)
