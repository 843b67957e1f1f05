"""No pickle anywhere in the code (docs/architecture.md, "Invariants": no pickle). Weights travel as
safetensors, everything else as JSON; a pickle (or a torch.load that may unpickle) would let a
tampered blob run code. The runtime packages are checked, and tools/ and benchmarks/ too: they read
datasets (``npz:<path>``) that a user hands them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "consumers", "zoo_store", "tools", "benchmarks")
# modules that deserialise arbitrary objects (pickle and its relatives)
FORBIDDEN = re.compile(r"\b(pickle|cPickle|cloudpickle|dill|joblib|shelve|marshal)\b")
TORCH_LOAD = re.compile(r"torch\.load\(([^()]|\([^()]*\))*\)", re.S)
NP_LOAD = re.compile(r"\b(np|numpy)\.load\(([^()]|\([^()]*\))*\)", re.S)


def _sources():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 10, "package sources not found"
    return [(p.relative_to(ROOT), p.read_text()) for p in files]


def test_no_pickle_in_the_package():
    hits = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for path, text in _sources() for m in FORBIDDEN.finditer(text)]
    assert not hits, "pickle-family module named in the package:\n" + "\n".join(hits)


def test_every_torch_load_is_weights_only():
    hits = [f"{path}: {m.group(0)}" for path, text in _sources() for m in TORCH_LOAD.finditer(text)
            if "weights_only=True" not in m.group(0)]
    assert not hits, "torch.load without weights_only=True:\n" + "\n".join(hits)


def test_every_numpy_load_refuses_pickles():
    hits = [f"{path}: {m.group(0)}" for path, text in _sources() for m in NP_LOAD.finditer(text)
            if "allow_pickle=False" not in m.group(0)]
    assert not hits, "np.load without allow_pickle=False:\n" + "\n".join(hits)


def test_the_checks_catch_what_they_should():
    assert FORBIDDEN.search("import " + "pickle") and FORBIDDEN.search("from cloud" + "pickle import x")
    assert not FORBIDDEN.search("np.load(p, allow_pickle=False)") and not FORBIDDEN.search("never unpickles")
    unsafe_load = "torch" + ".load(io.BytesIO(b), map_location='cpu')"  # split: this file is scanned too
    assert [m.group(0) for m in TORCH_LOAD.finditer(unsafe_load)]
