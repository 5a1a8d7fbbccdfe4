"""models.photos: bundled real photos, augmented crops, and the calibration/evaluation split by photo."""

from __future__ import annotations

import numpy as np
import pytest

from models import photos
from models.photos import (EVALUATION_PHOTOS, IMAGENET_MEAN, IMAGENET_STD, centre_crop, crops, imagenet_batch,
                           load_photo, photo_split, row_photos, write_calibration)

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def split():
    return photo_split(64, 16)


def test_photos_load_as_rgb_uint8():
    names = photos.PHOTOS
    assert len(names) >= 20
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "cat" not in names  # an alias of chelsea: it would put one photo on both sides of a split
    grey = set(photos.GREY_PHOTOS)
    assert grey and grey < set(names)  # colour and grey photos both present
    digests = set()
    for name in names:
        image = load_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 64, name
        digests.add(image.tobytes()[:: 997])
    assert len(digests) == len(names)  # no two names hold the same pixels
    assert np.array_equal(load_photo("camera")[..., 0], load_photo("camera")[..., 2])  # grey → 3 channels
    with pytest.raises(ValueError, match="unknown or unavailable"):
        load_photo("no-such-photo")


def test_crops_deterministic_per_seed_and_shaped():
    a = crops("astronaut", 6, size=96, seed=3)
    assert a.shape == (6, 96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, crops("astronaut", 6, size=96, seed=3))
    assert not np.array_equal(a, crops("astronaut", 6, size=96, seed=4))
    assert len({c.tobytes() for c in a}) == 6  # augmented: six different crops
    # an array gives the same crops as its name
    assert np.array_equal(crops(load_photo("astronaut"), 6, size=96, seed=3), a)
    assert crops("coins", 0).shape == (0, 224, 224, 3)


def test_imagenet_normalisation():
    images = crops("coffee", 3, seed=1)
    batch = imagenet_batch(images)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32
    want = ((images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(batch, want, atol=1e-5)
    low, high = (0 - IMAGENET_MEAN) / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    for c in range(3):
        assert low[c] - 1e-5 <= batch[:, c].min() and batch[:, c].max() <= high[c] + 1e-5


def test_split_is_by_photo(split):
    calibration, evaluation, calibration_photos, evaluation_photos = split
    assert calibration.shape == (64, 3, 224, 224) and calibration.dtype == np.float32
    assert evaluation.shape == (16, 3, 224, 224) and evaluation.dtype == np.float32
    assert calibration.flags.c_contiguous and evaluation.flags.c_contiguous
    assert calibration_photos and evaluation_photos
    assert not set(calibration_photos) & set(evaluation_photos)
    assert set(evaluation_photos) <= set(EVALUATION_PHOTOS)
    assert len(evaluation_photos) >= 5
    grey = set(photos.GREY_PHOTOS)
    assert set(evaluation_photos) & grey and set(evaluation_photos) - grey  # mixes colour and grey
    assert set(calibration_photos) | set(evaluation_photos) == set(photos.PHOTOS)  # 64 rows cover every photo
    # rows are normalised images: channel means near ImageNet-normalised photo statistics, not raw pixels
    assert np.all(np.abs(calibration.mean(axis=(0, 2, 3))) < 1.0)
    assert 0.5 < float(calibration.std()) < 1.6
    # deterministic; the seed moves the crops but not the photo sets
    again = photo_split(64, 16)
    assert np.array_equal(again.calibration, calibration) and np.array_equal(again.evaluation, evaluation)
    other = photo_split(8, 8, seed=1)
    assert not np.array_equal(other.evaluation, evaluation[:8])
    assert set(other.evaluation_photos) <= set(evaluation_photos)


def test_split_held_out_photos_can_be_chosen():
    s = photo_split(4, 4, size=64, held_out_photos=("moon", "rocket"))
    assert s.evaluation_photos == ("moon", "rocket")
    assert "moon" not in s.calibration_photos and "rocket" not in s.calibration_photos
    assert row_photos(s.evaluation_photos, 4) == ["moon", "rocket", "moon", "rocket"]
    with pytest.raises(ValueError, match="held-out"):
        photo_split(4, 4, held_out_photos=("no-such-photo",))


def test_write_calibration_and_cli(tmp_path):
    array = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    path = write_calibration(tmp_path / "c.npz", array)
    with np.load(path) as data:
        assert list(data.keys()) == ["input"]
        np.testing.assert_array_equal(data["input"], array)
    assert photos.main(["--calib", "3", "--eval", "2", "--size", "32", "--out", str(tmp_path / "cli")]) == 0
    with np.load(tmp_path / "cli" / "calib.npz") as calib, np.load(tmp_path / "cli" / "eval.npz") as ev:
        assert calib["input"].shape == (3, 3, 32, 32) and ev["input"].shape == (2, 3, 32, 32)
    assert (tmp_path / "cli" / "photos.json").is_file()


def _lite0_session(corpus):
    from onnxmerge.runner import make_session

    return make_session(str(corpus["efficientnet_lite0_dynamic"]))


def test_pretrained_lite0_recognises_held_out_photos(corpus, split):
    """The photos are real enough for an ImageNet model: the centre crop of chelsea is a cat, and the random
    evaluation crops of chelsea and coffee mostly show a cat / a coffee cup in their top 5."""
    session = _lite0_session(corpus)
    logits = session.run(None, {"input": imagenet_batch(centre_crop("chelsea"))})[0][0]
    assert set(np.argsort(-logits)[:5]) & set(CAT_CLASSES)

    rows = row_photos(split.evaluation_photos, len(split.evaluation))
    top5 = np.argsort(-session.run(None, {"input": split.evaluation})[0], axis=1)[:, :5]
    for name, classes in (("chelsea", set(CAT_CLASSES)), ("coffee", COFFEE_CLASSES)):
        assert name in split.evaluation_photos
        hits = [bool(set(top5[i]) & classes) for i, r in enumerate(rows) if r == name]
        assert hits and np.mean(hits) >= 0.5, (name, top5[[i for i, r in enumerate(rows) if r == name]])
