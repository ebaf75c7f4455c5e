"""Bundled digits, image folders, and the seeded batch stream."""

import hashlib
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from symtools.data import BatchStream, load_digits, load_image_folder, make_loader
from symtools.data import digits as digits_module
from symtools.errors import SymtoolsError

SKLEARN_DIGITS_SHA256 = "267f86e03ae0481efa68bbcf4dcd04133dbc88a3145b0551cb2221500a4881e0"


def test_digits_shapes_labels_and_split():
    train, test, everything = (load_digits(split=s) for s in ("train", "test", "all"))
    assert train.x.shape == (1438, 3, 32, 32) and test.x.shape == (359, 3, 32, 32) and len(everything) == 1797
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    assert not set(train.indices) & set(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(1797))
    # stratified: every class is split roughly 80/20
    counts = torch.bincount(test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    assert train.classes == 10 and train.input_shape == (3, 32, 32)


def test_digits_normalisation_uses_train_statistics():
    tr = load_digits(dtype=torch.float64, split="train")
    te = load_digits(dtype=torch.float64, split="test")
    # float64 mean of 1.5M values: round-off ~1e-13; 1e-10 leaves margin
    torch.testing.assert_close(tr.x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(tr.x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    # the test split is mapped by the *train* statistics, so its own mean is not exactly 0
    assert te.x.mean().abs() > 1e-6
    torch.testing.assert_close(te.mean, tr.mean)
    torch.testing.assert_close(te.std, tr.std)
    # the pipeline is the documented one: /16, bilinear resize (align_corners=False), channel copy, affine map
    images, labels = digits_module.raw_digits()
    i = int(tr.indices[5])
    ref = F.interpolate(torch.tensor(images[i] / 16.0)[None, None], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(tr.x[5], ((ref[0] - tr.mean[0]) / tr.std[0]).expand(3, -1, -1), atol=1e-12, rtol=0)
    assert int(tr.y[5]) == int(labels[i])


def test_digits_options_and_determinism():
    a, b = load_digits(seed=3), load_digits(seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not np.array_equal(load_digits(seed=4).indices, a.indices)  # negative control: the seed matters
    big = load_digits(image_size=64, channels=1, split="test")
    assert big.x.shape == (359, 1, 64, 64)
    assert load_digits(image_size=8).x.shape[-1] == 8
    with pytest.raises(SymtoolsError, match="split"):
        load_digits(split="validation")
    with pytest.raises(SymtoolsError, match="image_size"):
        load_digits(image_size=4)


def test_bundled_file_equals_scikit_learn_and_is_loaded_without_it(monkeypatch):
    digits_module._raw.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any import of scikit-learn would now fail
    images, labels = digits_module.raw_digits()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and labels.max() == 9
    # scikit-learn's load_digits() (sklearn/datasets/data/digits.csv.gz, checked against scikit-learn 1.9.1):
    # the SHA-256 of its data then target as int64, so that the comparison needs no scikit-learn here
    blob = np.ascontiguousarray(images.reshape(-1, 64), dtype=np.int64).tobytes() + \
        np.ascontiguousarray(labels, dtype=np.int64).tobytes()
    assert hashlib.sha256(blob).hexdigest() == SKLEARN_DIGITS_SHA256


def test_batch_stream_is_seeded_random_access_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    s1, s2 = make_loader("digits", 100, image_size=8, seed=7), make_loader("digits", 100, image_size=8, seed=7)
    it = iter(s1)
    first = [next(it) for _ in range(20)]  # 20 × 100 > 1438: crosses an epoch boundary
    for i, (x, y) in enumerate(first):
        x2, y2 = s2.batch(i)
        assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (100, 3, 8, 8)
    x5, _ = next(iter(s2.iter_from(5)))
    assert torch.equal(x5, first[5][0])
    assert torch.equal(torch.get_rng_state(), rng_before)
    # every example appears exactly once per epoch (epoch 0 = batches 0..13 and 38 of batch 14)
    seen = torch.cat([s1.indices(i) for i in range(15)])[:1438]
    assert torch.equal(seen.sort().values, torch.arange(1438))
    assert s1.classes == 10 and s1.input_shape == (3, 8, 8) and s1.config["data"] == "digits"
    other = make_loader("digits", 100, image_size=8, seed=8)  # negative control
    assert not torch.equal(other.indices(0), s1.indices(0))
    assert torch.equal(BatchStream(s1.dataset, 100, seed=7).indices(19), s1.indices(19))


def test_make_loader_rejects_unknown_data(tmp_path):
    with pytest.raises(SymtoolsError, match="digits"):
        make_loader("cifar10", 8)
    with pytest.raises(SymtoolsError, match="batch size"):
        make_loader("digits", 0)


def _write_images(folder, n, colour, ext):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (10 + i, 12), colour).save(folder / f"img{i}.{ext}")


def test_image_folder_layouts(tmp_path):
    tiny = tmp_path / "tiny"
    _write_images(tiny / "train" / "n01" / "images", 3, (255, 0, 0), "JPEG")
    _write_images(tiny / "train" / "n02" / "images", 2, (0, 0, 255), "JPEG")
    _write_images(tiny / "val" / "images", 2, (0, 0, 255), "JPEG")
    (tiny / "val" / "val_annotations.txt").write_text("img0.JPEG\tn02\t0\t0\t1\t1\nimg1.JPEG\tn01\t0\t0\t1\t1\n")
    ds = load_image_folder(tiny, image_size=16)
    assert len(ds) == 5 and ds.classes == 2 and ds.class_names == ["n01", "n02"]
    x, y = ds.batch(torch.arange(5))
    assert x.shape == (5, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(x.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-2, rtol=0)
    val = load_image_folder(tiny, image_size=16, split="val")
    assert val.batch(torch.arange(2))[1].tolist() == [1, 0]
    torch.testing.assert_close(val.mean, ds.mean)  # val uses the train statistics
    stream = make_loader(tiny, 4, image_size=16, seed=1)
    assert stream.classes == 2 and stream.batch(3)[0].shape == (4, 3, 16, 16)

    plain = tmp_path / "plain"
    _write_images(plain / "cat", 2, (10, 20, 30), "png")
    _write_images(plain / "dog", 3, (200, 100, 0), "jpg")
    pds = load_image_folder(plain, image_size=8, channels=1)
    assert len(pds) == 5 and pds.classes == 2 and pds[0][0].shape == (1, 8, 8)


def test_image_folder_errors(tmp_path, monkeypatch):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SymtoolsError, match="no images found"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(SymtoolsError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(SymtoolsError, match="pip install Pillow"):
        load_image_folder(tmp_path / "empty")
