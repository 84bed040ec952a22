"""Nothing the tool reads can run code: no pickle anywhere in the package, remote code only on a user's flag."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch

import neuroproj_prune as npp
from neuroproj_prune.errors import NeuroprojError

PKG = Path(npp.__file__).resolve().parent


def _sources():
    return sorted(PKG.rglob("*.py"))


def test_package_source_has_no_unsafe_loads():
    """A later change cannot bring back pickle: no `pickle`/`dill`/`joblib`/`marshal`, no `torch.load` without
    `weights_only=True`, no `allow_pickle=True`, no `yaml.load`/`unsafe_load`, no `eval(`/`exec(`, and
    `trust_remote_code=True` only where it is passed through from a user's flag."""
    bad = []
    for f in _sources():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            checks = [
                (r"\bimport (pickle|dill|joblib|marshal|cloudpickle)\b|\bfrom (pickle|dill|joblib|marshal)\b", "pickle"),
                (r"torch\.load\((?!.*weights_only=True)", "torch.load without weights_only=True"),
                (r"allow_pickle\s*=\s*True", "numpy allow_pickle"),
                (r"yaml\.(load|unsafe_load|full_load)\(", "yaml.load"),
                (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
                (r"trust_remote_code\s*=\s*True", "trust_remote_code=True"),
            ]
            bad += [f"{f.name}:{n}: {what}: {line.strip()}" for pat, what in checks if re.search(pat, code)]
    assert not bad, "\n".join(bad)


def test_the_scan_catches_what_it_claims(tmp_path):
    """The scan's patterns match the calls they forbid (so the test above could fail)."""
    samples = ["import pickle", "x = torch.load(p, weights_only=False)", "torch.load(p)", "yaml.load(s)",
               "eval(code)", "AutoModel.from_pretrained(p, trust_remote_code=True)"]
    pats = [r"\bimport (pickle|dill|joblib|marshal|cloudpickle)\b", r"torch\.load\((?!.*weights_only=True)",
            r"yaml\.(load|unsafe_load|full_load)\(", r"(?<![\w.])(eval|exec)\(", r"trust_remote_code\s*=\s*True"]
    for s in samples:
        assert any(re.search(p, s) for p in pats), s
    assert not re.search(pats[1], "torch.load(p, weights_only=True)")


class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_crafted_pickle_checkpoint_is_refused_unexecuted(tmp_path):
    """A pickle placed where a minibatch checkpoint is expected is refused with one line and never unpickled;
    a safetensors-named file holding a pickle is refused as unreadable."""
    lm_ids = torch.randint(0, 384, (8, 32), generator=torch.Generator().manual_seed(0))
    from conftest import make_tokenizer, tiny_model
    from neuroproj_prune.models import LoadedModel, model_fingerprint

    m = tiny_model("llama")
    lm = LoadedModel(m, make_tokenizer(), "tiny", model_fingerprint(m))
    ck = tmp_path / "ck"
    ck.mkdir()
    marker = tmp_path / "marker"
    kw = dict(mode="minibatch", dims=3, model=lm, data=lm_ids, batch_size=4, layers="0", progress=False,
              steps=2, checkpoint_dir=ck, resume=True)
    (ck / "step-0000001.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(NeuroprojError, match="pickle"):
        npp.project(**kw)
    (ck / "step-0000001.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(NeuroprojError, match="not a readable"):
        npp.project(**kw)
    assert not marker.exists()
