"""An installed wheel — not the editable checkout — runs the commands with their package data: the recipes by name,
the local lm-eval tasks and the zero-shot tasks. Built with `pip wheel`, installed with `--no-deps` into a fresh
virtual environment whose dependencies come from this one (a path in a .pth file: the checkout's editable finder
is not loaded), and run from a directory outside the checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import DATA, REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"   # built from a copy: the build leaves its build/ and egg-info behind, not in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp / "dist").glob("neuroproj_prune-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as z:   # installing a wheel is unpacking it (pip is not in the fresh venv)
        z.extractall(site)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    exe = venv / "bin" / "neuroproj-prune"
    exe.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom neuroproj_prune.cli import main\n"
                   "sys.exit(main())\n")
    exe.chmod(0o755)
    return wheel, exe, tmp


def _run(exe, args, cwd, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(NEUROPROJ_DATA_DIR=str(DATA), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_wheel_carries_the_package_data(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("neuroproj_prune/recipes/smollm2-135m.yaml", "neuroproj_prune/evaluate/local_tasks/local_wikitext2.yaml",
                 "neuroproj_prune/evaluate/local_tasks/utils.py", "neuroproj_prune/report/assets/view.js"):
        assert want in names, want


def test_installed_wheel_runs_from_outside_the_checkout(installed, tiny_dir):
    _, exe, tmp = installed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(exe.parent / "python"), "-c", "import neuroproj_prune; print(neuroproj_prune.__file__)"],
                           capture_output=True, text=True, cwd=tmp, env=env).stdout
    assert str(REPO) not in where, where    # the wheel's copy, not the checkout
    model = str(tiny_dir("llama"))
    r = _run(exe, ["eval", "--model", model, "--tasks", "piqa", "--limit", "5", "--seqlen", "128", "--quiet"], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "piqa" in r.stdout
    r = _run(exe, ["eval", "--model", model, "--tasks", "local_wikitext2", "--limit", "2", "--seqlen", "128",
                   "--quiet"], tmp)
    assert r.returncode == 0 and "word_perplexity" in r.stdout, r.stderr[-2000:]
    r = _run(exe, ["run", "--list"], tmp)
    assert r.returncode == 0 and "smollm2-135m" in r.stdout


@pytest.mark.slow
def test_installed_wheel_runs_a_shipped_recipe_by_name(installed):
    _, exe, tmp = installed
    out = tmp / "recipe-run"
    r = _run(exe, ["run", "smollm2-135m", "--set", f"output_dir={out}", "--set", "calibration.samples=8",
                   "--set", "calibration.seqlen=128", "--set", "stats.samples=2", "--set", "stats.sites=mlp.neurons",
                   "--set", "stats.layers=0", "--set", "heatmaps.layers=0", "--set", "eval.seqlen=128",
                   "--set", "eval.max_windows=1", "--set", "trace.max_new_tokens=1"], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("pruned/model.safetensors", "eval.json", "report.html"):
        assert (out / f).exists(), f
