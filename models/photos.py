"""Real photos for calibration and evaluation, from images bundled with scikit-image and scikit-learn.

Nothing is downloaded: only images shipped inside the installed wheels are used (scikit-image's data that
needs ``pooch`` and a download is never listed). Each photo loads as an H×W×3 uint8 array (grey images are
repeated over three channels, RGBA is composited over white, binary masks become 0/255).

    from models.photos import photo_split, write_calibration
    split = photo_split(512, 128)                 # calibration / evaluation crops, by photo
    write_calibration("calib.npz", split.calibration)

Augmentation (:func:`crops`): the photo is resized (``skimage.transform.resize``, anti-aliased) so that its
short side is one of ``SCALE_LEVELS`` evenly spaced sizes in [size, 2·size], a size×size window is cut at a
random place and mirrored left-right with probability ½. The scale is drawn from a few fixed levels (not a
continuum) so that each photo is resized at most ``SCALE_LEVELS`` times per crop size; the resized images are
cached (LRU) between calls. Everything is deterministic given the seed.

The split (:func:`photo_split`) is **by photo, never by crop**: the photos in ``EVALUATION_PHOTOS`` (chosen
by hand: four colour and three grey photos of different kinds — a cat, a cup of coffee, a flower, a deep-sky
image, a portrait, coins, a gravel texture) give the evaluation crops; calibration crops come only from the
other photos. No scene is on both sides: ``skimage.data.cat`` (the same pixels as ``chelsea``) is not
listed, any two sources with identical pixels count once, and the two stereo views of ``stereo_motorcycle``
both stay on the calibration side.

Rows are in round-robin order over the photos (row ``i`` comes from ``photos[i % len(photos)]``, see
:func:`row_photos`), so any tail of the calibration file — ``onnxmerge.compress`` holds out its last rows —
still covers every calibration photo.

Command line: ``python -m models.photos --calib N --eval M --out DIR`` writes ``DIR/calib.npz`` and
``DIR/eval.npz`` (one array ``input``, N×3×size×size float32, ImageNet-normalised) and ``DIR/photos.json``
(the photo names on each side).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SCALE_LEVELS = 8
INPUT_NAME = "input"

# Held out for evaluation (never used for calibration). Fixed by name, so the split does not move when a
# library version adds or drops an image; names not available here are simply absent from both sides.
EVALUATION_PHOTOS: tuple[str, ...] = ("camera", "chelsea", "coffee", "coins", "flower", "gravel",
                                      "hubble_deep_field")


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        image = getattr(data, name)()
        return image[index] if index is not None else image

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


# Only images bundled in the wheels (no pooch download). Synthetic test patterns (checkerboard, binary
# blobs, the Shepp-Logan phantom) are not photos and are left out, and so is skimage.data.cat (an alias of
# chelsea: the same photo under two names could land on both sides of the split).
_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    # colour
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "colorwheel": _skimage("colorwheel"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "logo": _skimage("logo"),
    "retina": _skimage("retina"),
    "rocket": _skimage("rocket"),
    "motorcycle_left": _skimage("stereo_motorcycle", 0),
    "motorcycle_right": _skimage("stereo_motorcycle", 1),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    # grey
    "brick": _skimage("brick"),
    "camera": _skimage("camera"),
    "cell": _skimage("cell"),
    "clock": _skimage("clock"),
    "coins": _skimage("coins"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "horse": _skimage("horse"),
    "microaneurysms": _skimage("microaneurysms"),
    "moon": _skimage("moon"),
    "page": _skimage("page"),
    "text": _skimage("text"),
}


def _to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 from grey, boolean, float in [0, 1], RGB or RGBA (composited over white)."""
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        scale = 255.0 if image.max() <= 1.0 else 1.0
        image = np.clip(np.rint(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        rgb = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"not an image: shape {image.shape}")
    return np.ascontiguousarray(image)


@functools.cache
def _catalogue() -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Load every source that works here (any that raises, e.g. needs a download, is skipped) and drop exact
    duplicates, keeping held-out names first (so a duplicate can never put a held-out photo's pixels on the
    calibration side); also note which photos are grey. Loaded once, on first use."""
    loaded: dict[str, np.ndarray] = {}
    grey: list[str] = []
    seen: set[str] = set()
    for name in sorted(_SOURCES, key=lambda n: (n not in EVALUATION_PHOTOS, n)):
        try:
            raw = np.asarray(_SOURCES[name]())
            image = _to_rgb_uint8(raw)
        except Exception:  # noqa: BLE001 - not installed, needs a download, unexpected format: not available
            continue
        digest = hashlib.sha256(image.tobytes() + str(image.shape).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        image.setflags(write=False)
        loaded[name] = image
        if raw.ndim == 2:
            grey.append(name)
    return {name: loaded[name] for name in sorted(loaded)}, tuple(sorted(grey))


def __getattr__(name: str):
    """``PHOTOS`` (the photos available here, in name order) and ``GREY_PHOTOS`` (those that were grey),
    computed on first use so that importing this module loads nothing."""
    if name == "PHOTOS":
        return list(_catalogue()[0])
    if name == "GREY_PHOTOS":
        return _catalogue()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_photos() -> list[str]:
    """The same list as ``PHOTOS``."""
    return list(_catalogue()[0])


def load_photo(name: str) -> np.ndarray:
    """The photo ``name`` as a read-only H×W×3 uint8 array."""
    images = _catalogue()[0]
    try:
        return images[name]
    except KeyError:
        raise ValueError(f"unknown or unavailable photo {name!r}; available: {', '.join(images)}") from None


def scale_levels(size: int = 224) -> np.ndarray:
    """The short-side lengths a crop's photo is resized to: ``SCALE_LEVELS`` values in [size, 2·size]."""
    return np.unique(np.rint(np.linspace(size, 2 * size, SCALE_LEVELS)).astype(int))


def _resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    from skimage.transform import resize

    h, w = image.shape[:2]
    k = short / min(h, w)
    shape = (max(short, int(round(h * k))), max(short, int(round(w * k))))
    if shape == (h, w):
        return image
    resized = resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)
    out = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=4 * SCALE_LEVELS)  # a few photos' worth (each call resizes a level once)
def _resized_photo(name: str, short: int) -> np.ndarray:
    return _resize_short_side(load_photo(name), short)


def clear_cache() -> None:
    """Drop the cached resized photos (the originals stay loaded)."""
    _resized_photo.cache_clear()


def crops(photo: str | np.ndarray, n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """``n`` augmented size×size crops of one photo (a name in PHOTOS, or an H×W×3 uint8 array), as an
    n×size×size×3 uint8 array: random scale (short side one of :func:`scale_levels`), random position, random
    left-right flip. The same photo, n, size and seed give the same crops."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    if n == 0:
        return out
    if isinstance(photo, str):
        resized = functools.partial(_resized_photo, photo)
        load_photo(photo)  # unknown names fail here, before any work
    else:
        image = _to_rgb_uint8(photo)
        resized = functools.lru_cache(maxsize=None)(functools.partial(_resize_short_side, image))
    rng = np.random.default_rng(seed)
    levels = scale_levels(size)
    shorts = rng.choice(levels, size=n)
    ys, xs, flips = rng.random(n), rng.random(n), rng.random(n) < 0.5
    for short in np.unique(shorts):  # each scale resized once per call (and cached across calls)
        image = resized(int(short))
        h, w = image.shape[:2]
        for i in np.flatnonzero(shorts == short):
            y, x = int(ys[i] * (h - size + 1)), int(xs[i] * (w - size + 1))
            window = image[y:y + size, x:x + size]
            out[i] = window[:, ::-1] if flips[i] else window
    return out


def centre_crop(photo: str | np.ndarray, size: int = 224, resize_to: int | None = None) -> np.ndarray:
    """The standard evaluation view: short side resized to ``resize_to`` (default size·256/224), the central
    size×size window, as a size×size×3 uint8 array."""
    image = load_photo(photo) if isinstance(photo, str) else _to_rgb_uint8(photo)
    image = _resize_short_side(image, resize_to or int(round(size * 256 / 224)))
    h, w = image.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(image[y:y + size, x:x + size])


def imagenet_batch(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """N×H×W×3 uint8 (or one H×W×3 image) → N×3×H×W float32, ``(x/255 − mean) / std`` with ImageNet's
    mean and std. ``out`` (N×3×H×W float32) is filled in place when given."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    n, h, w, _ = images.shape
    if out is None:
        out = np.empty((n, 3, h, w), dtype=np.float32)
    scale = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
    shift = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)
    for c in range(3):  # channel by channel: no N×H×W×3 float temporary
        np.multiply(images[..., c], scale[c], out=out[:, c], dtype=np.float32, casting="unsafe")
        out[:, c] -= shift[c]
    return out


def row_photos(photos: Sequence[str], n: int) -> list[str]:
    """The photo each of the ``n`` rows of a split array comes from (round-robin order)."""
    return [photos[i % len(photos)] for i in range(n)] if photos else []


class PhotoSplit(NamedTuple):
    calibration: np.ndarray  # n_calibration×3×size×size float32, ImageNet-normalised
    evaluation: np.ndarray  # n_evaluation×3×size×size float32
    calibration_photos: tuple[str, ...]  # the photos the calibration rows come from (round-robin order)
    evaluation_photos: tuple[str, ...]


def _photo_seed(seed: int, role: int, name: str) -> int:
    """A seed per (split seed, side, photo): a photo's crops do not change when other photos come or go."""
    return int(np.random.SeedSequence([seed, role, zlib.crc32(name.encode())]).generate_state(1)[0])


def _fill(names: Sequence[str], n: int, size: int, seed: int, role: int) -> tuple[np.ndarray, tuple[str, ...]]:
    used = tuple(names[:n])  # with fewer rows than photos, the first ones in name order
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for index, name in enumerate(used):
        count = len(range(index, n, len(used)))
        imagenet_batch(crops(name, count, size, _photo_seed(seed, role, name)), out=out[index::len(used)])
    return out, used


def photo_split(n_calibration: int, n_evaluation: int, size: int = 224, seed: int = 0,
                held_out_photos: Sequence[str] = EVALUATION_PHOTOS) -> PhotoSplit:
    """Calibration and evaluation crops, split by photo: evaluation crops come only from ``held_out_photos``
    (those available here), calibration crops only from every other photo in PHOTOS. Rows cycle through
    each side's photos in name order; each photo's crops are drawn with their own seed from ``seed``."""
    held = set(held_out_photos)
    photos = available_photos()
    evaluation_names = [p for p in photos if p in held]
    calibration_names = [p for p in photos if p not in held]
    if n_evaluation and not evaluation_names:
        raise ValueError(f"none of the held-out photos {sorted(held)} is available here")
    if n_calibration and not calibration_names:
        raise ValueError("no photo is left for calibration")
    calibration, calibration_used = _fill(calibration_names, n_calibration, size, seed, role=0)
    evaluation, evaluation_used = _fill(evaluation_names, n_evaluation, size, seed, role=1)
    return PhotoSplit(calibration, evaluation, calibration_used, evaluation_used)


def write_calibration(path: str | os.PathLike, array: np.ndarray, input_name: str = INPUT_NAME) -> Path:
    """Write ``array`` as an ``.npz`` with one array named ``input_name`` (onnxmerge's calibration format),
    atomically (a temp file moved into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-photos-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **{input_name: np.ascontiguousarray(array, dtype=np.float32)})
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.photos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib", type=int, default=512, help="calibration crops (default 512)")
    parser.add_argument("--eval", type=int, default=128, help="evaluation crops (default 128)")
    parser.add_argument("--out", type=Path, required=True, help="folder for calib.npz, eval.npz, photos.json")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    split = photo_split(args.calib, args.eval, size=args.size, seed=args.seed)
    write_calibration(args.out / "calib.npz", split.calibration)
    write_calibration(args.out / "eval.npz", split.evaluation)
    meta = {"size": args.size, "seed": args.seed, "normalisation": "imagenet mean/std",
            "calibration": {"rows": args.calib, "photos": list(split.calibration_photos)},
            "evaluation": {"rows": args.eval, "photos": list(split.evaluation_photos)}}
    (args.out / "photos.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{args.out}/calib.npz: {split.calibration.shape} from {len(split.calibration_photos)} photos; "
          f"{args.out}/eval.npz: {split.evaluation.shape} from {', '.join(split.evaluation_photos)} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
