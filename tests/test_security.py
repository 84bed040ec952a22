"""Nothing the tool reads can run code.

1. A scan of the package source (AST, so comments and strings do not count) for the calls that can execute
   code from a file: pickle and its relatives, `torch.load` without `weights_only=True`, `yaml.load`,
   `np.load(allow_pickle=True)`, `eval`/`exec`, and `trust_remote_code=True`; every transformers `Auto*`
   loader must say `trust_remote_code` explicitly (False, or a user's flag), because leaving it out makes
   transformers ask "[y/N]" on a terminal instead of refusing.  The scanner is checked on offending snippets
   first, so a scan that finds nothing means something.
2. Crafted pickles placed where `project --mode minibatch --resume` expects a checkpoint (an old-style
   `step-*.pt` and a pickle named `step-*.safetensors`) are refused with one line, exit 2, and the
   file their unpickling would create does not exist.
3. A model directory whose config points at custom code is refused without running it.
"""
from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import neuroproj_prune
from neuroproj_prune.cli import main

from conftest import C4

PACKAGE = Path(neuroproj_prune.__file__).resolve().parent
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
AUTO_LOADERS = {"from_pretrained", "from_config"}


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """'file:line: what' for every construct in `source` that could run code from data it reads."""
    found = []

    def bad(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLERS:
                    bad(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLERS:
                bad(node, f"from {node.module} import ...")
            if mod == "torch" and any(a.name == "load" for a in node.names):
                bad(node, "from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                bad(node, f"{node.func.id}()")
            if (name in ("__import__", "importlib.import_module")
                    and not (node.args and isinstance(node.args[0], ast.Constant))):
                bad(node, f"{name}() of a computed name")
            if name in ("torch.load", "torch.serialization.load") and not _is_const(kw.get("weights_only"), True):
                bad(node, f"{name} without weights_only=True")
            if name in ("torch.jit.load", "torch.package.PackageImporter"):
                bad(node, name)
            if name.startswith("yaml.") and name.split(".")[-1] in ("load", "load_all", "unsafe_load", "full_load",
                                                                     "unsafe_load_all", "full_load_all"):
                bad(node, f"{name} (use yaml.safe_load)")
            if name.split(".")[-1] in ("read_pickle", "loads") and name.split(".")[0] in PICKLERS | {"pd", "pandas"}:
                bad(node, name)
            if "allow_pickle" in kw and not _is_const(kw["allow_pickle"], False):
                bad(node, f"{name}(allow_pickle=...)")
            if "weights_only" in kw and _is_const(kw["weights_only"], False):
                bad(node, f"{name}(weights_only=False)")
            if "trust_remote_code" in kw and _is_const(kw["trust_remote_code"], True):
                bad(node, f"{name}(trust_remote_code=True) (only a user's flag may enable remote code)")
            if (isinstance(node.func, ast.Attribute) and node.func.attr in AUTO_LOADERS
                    and _dotted(node.func.value).split(".")[-1].startswith("Auto") and "trust_remote_code" not in kw):
                bad(node, f"{name} without an explicit trust_remote_code= (transformers would prompt [y/N])")
    return found


def test_scanner_finds_what_it_looks_for():
    offenders = {
        "import pickle": "import pickle",
        "from joblib import load": "from joblib",
        "import torch\ntorch.load(p)": "torch.load without",
        "import torch\ntorch.load(p, weights_only=False)": "torch.load without",
        "from torch import load": "from torch import load",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)": "yaml.load",
        "import numpy as np\nnp.load(p, allow_pickle=True)": "allow_pickle",
        "eval('1')": "eval()",
        "exec('x = 1')": "exec()",
        "__import__(name)": "computed name",
        "AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)": "trust_remote_code=True",
        "transformers.AutoConfig.from_pretrained(p)": "without an explicit trust_remote_code",
        "AutoTokenizer.from_pretrained(p, **kw)": "without an explicit trust_remote_code",
    }
    for src, what in offenders.items():
        hits = unsafe_calls(src)
        assert len(hits) >= 1 and any(what in h for h in hits), (src, hits)
    fine = ("import torch\ntorch.load(p, weights_only=True)\nmodel.eval()\nimport yaml\nyaml.safe_load(s)\n"
            "import ast\nast.literal_eval(s)\nAutoConfig.from_pretrained(p, trust_remote_code=False)\n"
            "AutoModelForCausalLM.from_pretrained(p, trust_remote_code=args.trust_remote_code)\n"
            "LlamaForCausalLM.from_pretrained(p)\nnp.load(p)\n__import__('pathlib')\n# import pickle\ns = 'torch.load(x)'\n")
    assert unsafe_calls(fine) == []


def test_package_source_has_no_code_running_loads():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10 and PACKAGE / "analysis" / "projection.py" in files
    found = [h for f in files for h in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))]
    assert found == []


# ------------------------------------------------------------------------- crafted checkpoint pickles
class _Payload:
    """Unpickling this creates (opens for writing) the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _error_lines(err: str) -> list[str]:
    """The `neuroproj-prune: error:` lines of stderr (transformers' progress bars share it)."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("neuroproj-prune: error:")]


def _project_resume(model_dir, ck, out):
    return main(["project", "--mode", "minibatch", "--model", str(model_dir), "--data", str(C4), "--samples", "4",
                 "--seqlen", "16", "--batch-size", "2", "--steps", "3", "--checkpoint-every", "1",
                 "--checkpoint-dir", str(ck), "--resume", "--out", str(out)])


def test_crafted_pickle_checkpoint_is_refused_unexecuted(tiny_dir, tmp_path, capsys):
    model_dir = tiny_dir("llama")
    marker = tmp_path / "MARKER"
    # control: the payload is live — unpickling it the old way (weights_only=False) creates its marker
    control = tmp_path / "control"
    torch.save(_Payload(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False).close()
    assert control.exists()

    cases = {"step-0000002.pt": ("old pickle checkpoint", "without --resume"),
             "step-0000002.safetensors": ("not a readable minibatch checkpoint", "without --resume")}
    for name, phrases in cases.items():
        ck = tmp_path / f"ck-{name}"
        ck.mkdir()
        if name.endswith(".pt"):
            torch.save(_Payload(marker), ck / name)             # what an old checkpoint looks like (zip + pickle)
        else:
            (ck / name).write_bytes(pickle.dumps(_Payload(marker)))
        out = tmp_path / f"p-{name}.safetensors"
        capsys.readouterr()
        assert _project_resume(model_dir, ck, out) == 2
        err = _error_lines(capsys.readouterr().err)
        assert len(err) == 1 and all(p in err[0] for p in phrases), err
        assert not marker.exists()
        assert not out.exists() and sorted(p.name for p in ck.iterdir()) == [name]   # nothing written

    # a stale .pt older than the newest safetensors checkpoint is left alone (never read); resume works
    ck = tmp_path / "ck-mixed"
    assert main(["project", "--mode", "minibatch", "--model", str(model_dir), "--data", str(C4), "--samples", "4",
                 "--seqlen", "16", "--batch-size", "2", "--steps", "2", "--checkpoint-every", "1",
                 "--checkpoint-dir", str(ck), "--out", str(tmp_path / "first.safetensors")]) == 0
    torch.save(_Payload(marker), ck / "step-0000001.pt")
    assert _project_resume(model_dir, ck, tmp_path / "mixed.safetensors") == 0
    assert not marker.exists() and (ck / "step-0000003.safetensors").is_file()


def test_model_with_custom_code_is_refused_unexecuted(tiny_dir, tmp_path, capsys):
    """A config whose auto_map points at code: refused with one line (no [y/N] prompt), the code never runs.
    With a known model_type, the built-in class is used and the custom code is ignored."""
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "configuration_evil.py").write_text(code)
    (evil / "config.json").write_text('{"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}')
    capsys.readouterr()
    assert main(["collect", "--model", str(evil), "--data", str(C4), "--out", str(tmp_path / "s.safetensors")]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "custom code" in err[0], err
    assert not marker.exists()

    known = tmp_path / "known"
    shutil.copytree(tiny_dir("llama"), known)
    import json

    cfg = json.loads((known / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (known / "config.json").write_text(json.dumps(cfg))
    (known / "configuration_evil.py").write_text(code)
    assert main(["collect", "--model", str(known), "--data", str(C4), "--samples", "2", "--seqlen", "16",
                 "--out", str(tmp_path / "s2.safetensors")]) == 0
    assert not marker.exists()
