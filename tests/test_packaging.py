"""A plain (non-editable) install must carry the passes as onnxmerge.passes, not only an editable one."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contains_passes_and_imports_standalone(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("onnxmerge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "onnxmerge/passes/fold_batchnorm.py" in names
    assert "onnxmerge/cli.py" in names
    assert not any(n.startswith(("models/", "tests/", "passes/", "bench/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import onnxmerge, onnxmerge.passes.merge_conv_chain as m; "
             "from onnxmerge.pass_framework import PASSES; "
             "assert onnxmerge.__file__.startswith(%r), onnxmerge.__file__; "
             "assert 'merge_conv_chain' in PASSES; print(len(PASSES))") % str(site)
    imported = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
                              capture_output=True, text=True, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) >= 10
