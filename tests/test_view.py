"""The report page (`view`) and prompt traces (`trace`).

The issue's "must show" list: a real headless browser (Debian's chromium, driven by Playwright with the system
binary) opens a page generated from a tiny run — no console errors, one point per neuron of the selected layer,
the layer slider changes the data, the token slider moves the highlight; token alignment of the trace against
direct forward passes; a run directory missing optional parts still renders, those sections absent. Issue 17:
the page size budget holds as it shrinks (the trace degrades in order), and a synthetic run of an 8B model's
size (tests/synth_run.py) builds in bounded time and memory, within 20 MB, and renders.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import neuroproj_prune as npp
from neuroproj_prune.cli import main
from neuroproj_prune.analysis.trace import load_trace
from neuroproj_prune.report.page import load_page_data, trace_activations

from conftest import SHAKESPEARE, WIKI, gqa_llama

CHROMIUM = os.environ.get("NPP_CHROMIUM", "/usr/bin/chromium")   # Debian's; NPP_CHROMIUM overrides
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                "--disable-dev-shm-usage"]
SITES = "mlp.neurons,mlp.out,attn.out"
PROMPT = "To be, or not to be: that is"


# ------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    """A complete tiny run: stats (3 sites, cross-layer window 1), projections, clusters, prune, heatmaps,
    eval, a one-cell sweep, skips, and a trace made through the CLI."""
    md = tiny_dir("llama")
    run = tmp_path_factory.mktemp("run")
    lm = npp.load_model(str(md), dtype="float32", device="cpu")
    st = npp.collect(lm, str(SHAKESPEARE), samples=8, seqlen=64, sites=SITES, cross_layer_window=1,
                     out=run / "stats.safetensors", progress=False)
    npp.project(st, dims=3, site=SITES, out=run / "projections.safetensors", progress=False)
    npp.cluster(run / "projections.safetensors", algo="kmeans", keep_fraction=0.5, out=run / "clusters.json")
    npp.prune(str(md), None, sparsity=0.5, select="flap", fold="lstsq", calibration="oneshot", stats=st,
              multiple=8, out=run / "pruned", progress=False)
    from neuroproj_prune.analysis.heatmap import heatmaps

    heatmaps(st, projections=run / "projections.safetensors", layers="0,1", out=run / "heatmaps", progress=False)
    npp.evaluate(str(md), data=str(WIKI), seqlen=64, max_windows=2, json_out=run / "eval_dense.json", progress=False)
    npp.evaluate(str(run / "pruned"), data=str(WIKI), seqlen=64, max_windows=2, json_out=run / "eval.json",
                 progress=False)
    npp.sweep(lm, str(SHAKESPEARE), str(WIKI), sparsities="0.25,0.5", select="flap,magnitude", fold="lstsq",
              calibration="oneshot", samples=4, seqlen=64, eval_seqlen=64, max_windows=2, multiple=8,
              out=run / "sweep", progress=False)
    npp.find_skips(st, min_r2=0.3, top_k=2, progress=False).save(run / "skips", min_r2=0.3)
    assert main(["trace", "--model", str(md), "--projections", str(run / "projections.safetensors"),
                 "--prompt", PROMPT, "--max-new-tokens", "6", "--out", str(run / "trace.safetensors")]) == 0
    assert main(["view", str(run), "--out", str(run / "report.html")]) == 0
    return run


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright. Missing → FAIL (not skip): CI installs it with scripts/setup.sh."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: the browser test needs Debian's chromium. Install it with "
                    f"`sudo apt-get update && sudo apt-get install -y chromium chromium-driver` (scripts/setup.sh "
                    f"does this as root)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install -e '.[test]' (or pip install playwright)",
                    pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        yield b
        b.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: errors.append(f"network request: {r.url}")
            if not r.url.startswith(("file:", "data:", "blob:", "about:")) else None)
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    return page, errors


def scatter_points(page) -> dict:
    return page.evaluate("""() => { const d = document.getElementById('scatter');
        const ids = [].concat(...d.data.map(t => Array.from(t.customdata)));
        return {key: d.getAttribute('data-key'), n: d.data.reduce((s, t) => s + t.x.length, 0), ids: ids,
                x: [].concat(...d.data.map(t => Array.from(t.x))),
                colors: [].concat(...d.data.map(t => Array.from(t.marker.color))),
                types: d.data.map(t => t.type)}; }""")


# ------------------------------------------------------------------------------------------ the tests
def test_browser_full_run(run_dir, browser):
    html = run_dir / "report.html"
    size = html.stat().st_size
    assert size < 8 * 2**20, size
    page, errors = open_page(browser, html)
    try:
        for sec in ("sec-projections", "sec-heatmaps", "sec-summary", "sec-eval", "sec-sweep", "sec-skips"):
            assert page.query_selector("#" + sec) is not None, sec
        N = npp.load_projections(run_dir / "projections.safetensors").get(0, "mlp.neurons").shape[0]
        s0 = scatter_points(page)
        assert s0["key"] == "0/mlp.neurons" and s0["types"][0] == "scatter3d"
        assert s0["n"] == N and sorted(s0["ids"]) == list(range(N))        # one point per neuron
        # the layer slider changes the data
        page.focus("#layer")
        page.keyboard.press("ArrowRight")
        page.wait_for_function("document.getElementById('scatter').getAttribute('data-key') === '1/mlp.neurons'")
        s1 = scatter_points(page)
        assert s1["n"] == N and s1["x"] != s0["x"]
        assert page.inner_text("#layer-label") == "1"
        # the token slider moves the highlight (and recolours the points by that token's activation)
        assert page.get_attribute("#tokens .tok.cur", "data-t") == "0"
        page.focus("#token")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        assert page.get_attribute("#tokens .tok.cur", "data-t") == "2"
        assert len(page.query_selector_all("#tokens .tok.cur")) == 1
        assert scatter_points(page)["colors"] != s1["colors"]
        T = len(load_trace(run_dir / "trace.safetensors").tokens)
        page.click(f"#tokens .tok[data-t='{T - 1}']")                     # clicking a token moves it too
        assert page.get_attribute("#tokens .tok.cur", "data-t") == str(T - 1)
        assert page.input_value("#token") == str(T - 1)
        assert "(generated)" in page.inner_text("#token-label")
        # another site: one point per hidden dimension
        page.select_option("#site", "attn.out")
        s2 = scatter_points(page)
        assert s2["key"] == "1/attn.out" and s2["n"] == 32
        # sortable tables: clicking "ppl" sorts the sweep cells by perplexity
        page.click("#sweep-table th[data-col='ppl']")
        col = page.evaluate("Array.from(document.querySelectorAll('#sweep-table tbody tr'))"
                            ".map(r => r.children[3].textContent)")
        vals = [float(v) for v in col if v not in ("–", "")]
        assert vals == sorted(vals) and len(vals) >= 3
        assert page.query_selector("#skips-map .main-svg") is not None        # layer × layer map drawn
        assert page.query_selector("#skips-table-0 tbody tr") is not None
        assert page.get_attribute("#heatmap-img", "src").startswith("data:image/png;base64,")
        assert errors == []
    finally:
        page.close()


def _direct(model, ids: torch.Tensor, layers, sites):
    """Activations at the LAST position of a plain forward pass over `ids`, with hooks of this test's own."""
    out, hs = {}, []
    for i in layers:
        layer = model.model.layers[i]
        if "mlp.neurons" in sites:
            hs.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, i=i: out.__setitem__((i, "mlp.neurons"), a[0][0, -1].clone())))
        if "mlp.out" in sites:
            hs.append(layer.mlp.register_forward_hook(
                lambda m, a, o, i=i: out.__setitem__((i, "mlp.out"), o[0, -1].clone())))
        if "attn.out" in sites:
            hs.append(layer.self_attn.register_forward_hook(
                lambda m, a, o, i=i: out.__setitem__((i, "attn.out"), o[0][0, -1].clone())))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
    finally:
        for h in hs:
            h.remove()
    return out, logits


def test_token_alignment(run_dir, tiny_dir):
    """Row t of the page's trace data = the activation of a direct forward pass over tokens 0..t at position t,
    for prompt and generated tokens; greedy tokens are the argmax of the logits before them."""
    tr = load_trace(run_dir / "trace.safetensors")
    data = load_page_data(run_dir / "report.html")
    ids = tr.input_ids
    T, n_prompt = len(ids), tr.n_prompt
    assert T == n_prompt + 6 and data["trace"]["n_prompt"] == n_prompt and data["trace"]["input_ids"] == ids.tolist()
    assert len(data["trace"]["tokens"]) == T and "".join(data["trace"]["tokens"]).startswith(PROMPT)
    assert data["trace"]["encoding"] == "f2"
    lm = npp.load_model(str(tiny_dir("llama")), dtype="float32", device="cpu")
    keys = sorted(data["trace"]["acts"])
    assert len(keys) == 9                                               # 3 layers x 3 sites
    page = {k: trace_activations(data, k) for k in keys}
    for t in range(T):
        direct, logits = _direct(lm.model, ids[None, : t + 1], tr.layers, tr.sites)
        for k in keys:
            i, site = k.split("/")
            ref = direct[(int(i), site)].float().numpy()
            np.testing.assert_allclose(tr.get(int(i), site)[t].numpy(), ref, rtol=1e-4, atol=1e-5)   # file: float32
            tol = 2e-3 * max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(page[k][t], ref, rtol=2e-3, atol=tol)                          # page: float16
            if t > 0:   # a shifted row would not match: neighbouring positions differ
                assert not np.allclose(page[k][t - 1], ref, rtol=2e-3, atol=tol)
        if n_prompt - 1 <= t < T - 1:
            assert int(logits.argmax()) == int(ids[t + 1])              # greedy continuation


def test_missing_parts_render(run_dir, browser, tmp_path):
    """Only projections, clusters and a pruned checkpoint: no sweep, skips, eval, heatmaps or trace sections,
    the rest renders without errors; an empty directory is refused (one error, no page)."""
    part = tmp_path / "part"
    part.mkdir()
    for f in ("projections.safetensors", "clusters.json"):
        shutil.copy(run_dir / f, part / f)
    shutil.copytree(run_dir / "pruned", part / "pruned")
    out = npp.view(part, part / "report.html", model=None)
    data = load_page_data(out)
    assert data["sweep"] is None and data["skips"] is None and data["trace"] is None and data["eval"] is None
    assert data["projections"]["energy_kind"] == "E[h²]"
    assert "energy" not in data["projections"]["points"]["0/mlp.neurons"]
    page, errors = open_page(browser, out)
    try:
        for sec in ("sec-sweep", "sec-skips", "sec-eval", "sec-heatmaps", "trace-controls", "token"):
            assert page.query_selector("#" + sec) is None, sec
        assert page.query_selector("#sec-summary") is not None
        s = scatter_points(page)
        assert s["n"] == 64 and s["key"] == "0/mlp.neurons"
        page.hover("#sec-projections h2")
        assert errors == []
    finally:
        page.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(npp.NeuroprojError, match="holds nothing the report shows"):   # not a page saying nothing
        npp.view(empty, tmp_path / "empty.html")
    assert not (tmp_path / "empty.html").exists()


def test_size_limit_quantizes_trace(run_dir, tiny_dir, tmp_path):
    """int8 trace activations with a per-token scale stay within half a quantization step; as the size limit
    shrinks, the page never exceeds it and degrades in order — float16 trace, int8, every k-th layer of the
    trace, no trace — saying so each time; below the page's own code the limit is refused in one line."""
    from neuroproj_prune.errors import NeuroprojError

    out = npp.view(run_dir, tmp_path / "i8.html", model=None, trace_encoding="i1")
    data = load_page_data(out)
    assert data["trace"]["encoding"] == "i1" and any("8-bit" in n for n in data["notes"])
    tr = load_trace(run_dir / "trace.safetensors")
    for k in data["trace"]["acts"]:
        i, site = k.split("/")
        ref = tr.get(int(i), site).numpy()
        err = np.abs(trace_activations(data, k) - ref).max(1)
        assert (err <= np.abs(ref).max(1) / 127 * 0.51 + 1e-6).all()
    plotly_mb = len(__import__("plotly.offline", fromlist=["get_plotlyjs"]).get_plotlyjs()) / 2**20
    with pytest.raises(NeuroprojError, match="leaves no room for data"):
        npp.view(run_dir, tmp_path / "x.html", model=None, max_mb=plotly_mb)
    # a long trace (T = 262: ~270 kB as float16) next to ~10 kB of points, nothing else
    d = tmp_path / "long"
    d.mkdir()
    for f in ("projections.safetensors", "clusters.json"):
        shutil.copy(run_dir / f, d / f)
    npp.trace(str(tiny_dir("llama")), d / "projections.safetensors", PROMPT, max_new_tokens=250,
              out=d / "trace.safetensors")
    full = npp.view(d, tmp_path / "full.html", model=None).stat().st_size
    assert load_page_data(tmp_path / "full.html")["trace"]["encoding"] == "f2"
    payload = re.search(r'id="npp-data">(.*?)</script>', (tmp_path / "full.html").read_text(), re.S).group(1)
    code = full - len(payload)                           # the page less its data
    seen, last = [], (0, 1)
    top = full + 40_000                                  # the planner holds back room for the notes
    for k in range(24):                                  # from the full page down to 80 kB of room for data
        mb = (top - (top - code - 80_000) * k / 23) / 2**20
        page = npp.view(d, tmp_path / "s.html", model=None, max_mb=mb)
        assert page.stat().st_size <= mb * 2**20, (mb, page.stat().st_size)
        data = load_page_data(page)
        t = data["trace"]
        state = 3 if t is None else 0 if t["encoding"] == "f2" else 1 if t["layer_step"] == 1 else 2
        assert state >= last[0], (mb, state, last)       # never back to a finer trace on a smaller page
        if state == 2:
            assert t["acts"] and t["layer_step"] >= last[1] and len(t["acts"]) < 9
            assert any("every" in n and "layer" in n for n in data["notes"])
        if state in (1, 2):
            assert any("8-bit" in n for n in data["notes"])
        if state == 3:
            assert any(n.startswith("trace: not shown") for n in data["notes"])
        last = (state, t["layer_step"] if t else last[1])
        seen.append(state)
    assert {0, 1, 2} <= set(seen), seen


def test_trace_api_sampling_and_errors(run_dir, tiny_dir, tmp_path):
    from neuroproj_prune.errors import NeuroprojError

    md = str(tiny_dir("llama"))
    a = npp.trace(md, run_dir / "projections.safetensors", PROMPT, max_new_tokens=5, sample=True, seed=3,
                  sites="mlp.neurons", layers="1")
    b = npp.trace(md, run_dir / "projections.safetensors", PROMPT, max_new_tokens=5, sample=True, seed=3,
                  sites="mlp.neurons", layers="1", out=tmp_path / "t.safetensors")
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.layers == [1] and a.sites == ["mlp.neurons"]
    assert load_trace(tmp_path / "t.safetensors").meta["sample"] is True
    other = tiny_dir("llama", inter=48)
    with pytest.raises(NeuroprojError, match="another model"):
        npp.trace(str(other), run_dir / "projections.safetensors", PROMPT, max_new_tokens=1)


@pytest.mark.parametrize("dims", [2, 1])
def test_2d_and_strip(run_dir, browser, tmp_path, dims):
    """n = 2 draws a 2D scatter, n = 1 a strip; one point per neuron either way, no console errors."""
    d = tmp_path / f"d{dims}"
    d.mkdir()
    npp.project(run_dir / "stats.safetensors", dims=dims, site="mlp.neurons", layers="0,2",
                out=d / "projections.safetensors", progress=False)
    shutil.copy(run_dir / "clusters.json", d / "clusters.json")
    page, errors = open_page(browser, npp.view(d, d / "report.html", model=None))
    try:
        s = scatter_points(page)
        assert s["n"] == 64 and set(s["types"]) == {"scatter"} and sorted(s["ids"]) == list(range(64))
        page.focus("#layer")
        page.keyboard.press("ArrowRight")
        assert scatter_points(page)["key"] == "2/mlp.neurons"
        assert errors == []
    finally:
        page.close()


def test_head_site_beside_mlp(browser, tokenizer, tmp_path):
    """The head site (attn.heads) of a grouped-query llama (4 layers, 6 query heads of 8 channels in 2 key/value
    groups) with a plan/2 applied by prune: layer 0 loses query heads 1 and 4, layer 1 key/value group 0 (heads
    0-2), layer 2 is removed whole, layer 3 untouched. The page's data: a head-site set per layer whose roles mark
    exactly the removed heads' channels (head h = channels 8h..8h+7), the dropped layer's MLP and heads all removed,
    per-layer head rows (H, KV, roles, dropped) and per-head energy equal to Σ over the head's channels of E[z²]
    taken by a hook of this test's own on o_proj (times ‖W_o[:, c]‖² with the model given); the summary lists the
    plan's heads and dropped layer. In the browser: one legend entry per head with the removed ones grey ×, the
    per-head table and the layers × heads map beside the scatter, the dropped layer struck through in the layer
    list, no console errors."""
    import copy

    from neuroproj_prune.model import LoadedModel, model_fingerprint
    from neuroproj_prune.prune import Plan

    model = gqa_llama()
    lm = LoadedModel(model, tokenizer, "tiny-gqa", model_fingerprint(model))
    ids = torch.randint(1, 384, (6, 32), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    st = npp.collect(lm, ids, sites="mlp.neurons,attn.heads", compute_dtype="float32",
                     out=run / "stats.safetensors", progress=False)
    npp.project(st, dims=3, site="mlp.neurons,attn.heads", out=run / "projections.safetensors", progress=False)
    z: dict[int, list] = {}
    hs = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a, i=i: z.setdefault(i, []).append(a[0].reshape(-1, 48).double())) for i in range(4)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    ez2 = {i: torch.cat(v).pow(2).mean(0).numpy() for i, v in z.items()}                # E[z_c²], (48,)
    w2 = {i: model.model.layers[i].self_attn.o_proj.weight.double().pow(2).sum(0).numpy() for i in range(4)}
    plan = Plan(heads={0: {"heads": 6, "kv_heads": 2, "keep": [0, 2, 3, 5], "keep_kv": [0, 1]},
                       1: {"heads": 6, "kv_heads": 2, "keep": [3, 4, 5], "keep_kv": [1]}}, drop=[2], no_attn=[3])
    plan.save(tmp_path / "plan.json")
    npp.prune(LoadedModel(copy.deepcopy(model), tokenizer, "tiny-gqa", lm.fingerprint), ids,
              plan_file=tmp_path / "plan.json", out=run / "pruned", multiple=1, batch_size=8,
              compute_dtype="float32", progress=False)
    removed = {0: {1, 4}, 1: {0, 1, 2}, 2: set(range(6)), 3: set(range(6))}   # 3: its attention removed

    data = load_page_data(npp.view(run, tmp_path / "plain.html", model=None))
    P = data["projections"]
    assert P["sites"] == ["mlp.neurons", "attn.heads"] and P["dropped"] == [2]
    assert P["plan_source"] == "pruned/plan.json"
    H = P["heads"]
    assert H["head_dim"] == 8 and [r["layer"] for r in H["rows"]] == [0, 1, 2, 3]
    for i in range(4):
        e = P["points"][f"{i}/attn.heads"]
        want = np.repeat([int(h in removed[i]) for h in range(6)], 8)
        assert e["N"] == 48 and e["M"] == 48 and e["role"].tolist() == want.tolist(), i
        assert (e["rep"] == -1).all() and bool(e.get("dropped")) == (i == 2)
        np.testing.assert_allclose(e["energy"], ez2[i], rtol=1e-4)                       # float32 on the page
        row = H["rows"][i]
        assert (row["H"], row["KV"], row["dropped"], row["attention_removed"]) == (6, 2, i == 2, i == 3)
        assert row["role"] == [int(h in removed[i]) for h in range(6)], i
        np.testing.assert_allclose(row["energy"], ez2[i].reshape(6, 8).sum(1), rtol=1e-5)
    m2 = P["points"]["2/mlp.neurons"]
    assert m2["dropped"] and (m2["role"] == 1).all()                                   # the whole layer goes
    assert "role" not in P["points"]["0/mlp.neurons"]       # the plan leaves the MLPs alone (no clustering here)
    S = data["summary"]
    assert S["dropped"] == [2] and S["summary"]["dropped_layers"] == [2]
    assert S["heads"] == [{"layer": 0, "before": 6, "kept": 4, "kv_before": 2, "kv_kept": 2},
                          {"layer": 1, "before": 6, "kept": 3, "kv_before": 2, "kv_kept": 1}]

    weighted = tmp_path / "weighted.html"
    Pw = load_page_data(npp.view(run, weighted, model=lm))["projections"]
    assert "W_o" in Pw["energy_kind"] and "W_o" in Pw["heads"]["energy_kind"]
    for i in range(4):
        np.testing.assert_allclose(Pw["heads"]["rows"][i]["energy"], (ez2[i] * w2[i]).reshape(6, 8).sum(1), rtol=1e-5)
        np.testing.assert_allclose(Pw["points"][f"{i}/attn.heads"]["energy"], ez2[i] * w2[i], rtol=1e-4)

    page, errors = open_page(browser, weighted)
    try:
        assert page.get_attribute("#layer-list .lyr[data-layer='2']", "class") == "lyr dropped"
        assert page.get_attribute("#layer-list .lyr[data-layer='0']", "class") == "lyr cur"
        assert page.get_attribute("#heads-map", "data-removed") == str(sum(map(len, removed.values())))
        assert page.query_selector("#heads-map .main-svg") is not None
        page.select_option("#site", "attn.heads")
        tr = page.evaluate("""() => document.getElementById('scatter').data.map(t => ({name: t.name,
            ids: Array.from(t.customdata), color: t.marker.color[0], symbol: t.marker.symbol}))""")
        assert len(tr) == 6 and all(t["name"].startswith(f"head {h} · kv {h // 3}") for h, t in enumerate(tr))
        for h, t in enumerate(tr):
            assert sorted(t["ids"]) == list(range(8 * h, 8 * h + 8))                  # channels of head h
            assert ("removed" in t["name"]) == (h in removed[0]) and (t["symbol"] == "x") == (h in removed[0])
            assert (t["color"] == "#9e9e9e") == (h in removed[0])
        status = page.evaluate("Array.from(document.querySelectorAll('#heads-table tr[data-head]'))"
                               ".map(r => r.className)")
        assert status == ["removed" if h in removed[0] else "" for h in range(6)]
        page.click("#layer-list .lyr[data-layer='2']")
        page.wait_for_function("document.getElementById('scatter').getAttribute('data-key') === '2/attn.heads'")
        assert "removed whole" in page.inner_text("#info")
        assert page.get_attribute("#layer-list .lyr[data-layer='2']", "class") == "lyr dropped cur"
        assert page.query_selector("#summary-heads tbody tr") is not None
        assert errors == []
    finally:
        page.close()


def test_second_moment_diagonals_match_stats(run_dir, tmp_path):
    """The report's streamed E[h²] (count, shift, sum and the Gram's diagonal only) equals Var + μ² from the
    fully loaded statistics, for every layer and site; a damaged file is refused in one line."""
    from neuroproj_prune.errors import NeuroprojError
    from neuroproj_prune.stats import load_stats, second_moment_diagonals

    st = load_stats(run_dir / "stats.safetensors")
    meta, e2 = second_moment_diagonals(run_dir / "stats.safetensors")
    assert meta["layers"] == st.layers and sorted(e2) == sorted((i, s) for i in st.layers for s in st.sites)
    for (i, s), v in e2.items():
        ref = (st.variance(i, s) + st.mean(i, s) ** 2).numpy()
        np.testing.assert_allclose(v, ref, rtol=1e-12, atol=1e-12)
    assert sorted(second_moment_diagonals(run_dir / "stats.safetensors", layers=[1], sites=["attn.out"])[1]) == \
        [(1, "attn.out")]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((run_dir / "stats.safetensors").read_bytes()[:5000])
    with pytest.raises(NeuroprojError, match="not a readable statistics file"):
        second_moment_diagonals(bad)


def test_8b_run_report_within_budget(browser, tmp_path):
    """A synthetic run directory of an 8B model (32 layers × 14336 neurons × 3 sites: a 57 GiB statistics
    file, 720k projected points, a 48-token trace of all of them, 32 heatmaps, a 444k-row skips CSV): the
    report is built in bounded time and memory (the statistics cannot even be loaded: this machine has less
    memory than that file), stays within the default 20 MB, says what it thinned and how to see all, and
    renders in the browser — layer switching, site switching and the token slider work on thinned data."""
    import subprocess
    import sys
    import time

    from neuroproj_prune.stats import second_moment_diagonals
    from synth_run import make_run

    run = tmp_path / "run8b"
    try:
        t0 = time.time()
        make_run(run)
        gen_s = time.time() - t0
        assert (run / "stats.safetensors").stat().st_size > 57 * 2**30
        out = tmp_path / "report.html"
        # VmHWM, the peak of this process's own memory since exec; not ru_maxrss, which also counts the
        # pages of the forked pytest parent before exec (4.7 GB late in a full suite run)
        code = ("import re, sys, time; t = time.time(); from neuroproj_prune.cli import main; "
                f"rc = main(['view', {str(run)!r}, '--out', {str(out)!r}]); "
                "hwm = re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1); "
                "print('RESULT', rc, time.time() - t, hwm)")
        env = {**os.environ, "PYTHONPATH": str(Path(npp.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        rc, build_s, rss_kb = p.stdout.split("RESULT")[1].split()
        assert int(rc) == 0 and float(build_s) < 120, build_s
        assert int(rss_kb) < 1536 * 1024, f"view held {int(rss_kb) // 1024} MB"   # the import alone: ~230 MB
        print(f"8B run: generated in {gen_s:.1f} s; report built in {float(build_s):.1f} s, peak RSS "
              f"{int(rss_kb) // 1024} MB, {out.stat().st_size / 2**20:.2f} MB")
        assert out.stat().st_size <= 20 * 2**20

        data = load_page_data(out)
        P = data["projections"]
        assert P["layers"] == list(range(32)) and P["shown"]["layer_step"] == 1
        M = P["shown"]["max_points"]
        assert 1000 < M < 14336
        assert P["decimation"] and "--max-mb" in P["decimation"] and "--layers" in P["decimation"]
        e = P["points"]["7/mlp.neurons"]
        assert e["N"] == 14336 and e["M"] == M and e["idx"].shape == (M,)
        idx = e["idx"].astype(np.int64)
        assert idx[0] == 0 and idx[-1] == 14335 and (np.diff(idx) > 0).all() and np.diff(idx).max() <= -(-14335 // (M - 1))
        ref = npp.load_projections(run / "projections.safetensors").get(7, "mlp.neurons").numpy()
        np.testing.assert_allclose(e["xyz"].astype(np.float32), ref[idx], rtol=1e-3, atol=1e-3)
        e2 = second_moment_diagonals(run / "stats.safetensors", layers=[7], sites=["mlp.neurons"])[1]
        np.testing.assert_allclose(e["energy"], e2[(7, "mlp.neurons")][idx], rtol=1e-6)
        plan = __import__("json").loads((run / "pruned" / "plan.json").read_text())["layers"]["7"]
        assert (e["role"] == 1).sum() == np.isin(idx, plan["keep"], invert=True).sum()
        assert P["points"]["7/attn.out"]["M"] == 4096 and P["points"]["7/attn.out"]["idx"] is None
        t = data["trace"]
        assert t["encoding"] == "i1" and t["layer_step"] > 1 and t["acts"]
        assert all(a["W"] == P["points"][k]["M"] for k, a in t["acts"].items())   # the columns shown
        notes = " ".join(data["notes"])
        assert "heatmaps:" in notes and "trace: activations kept for one layer in every" in notes
        assert "skips/skips.csv: the" in notes and "444416" in notes

        page, errors = open_page(browser, out)
        try:
            assert page.is_visible("#notes") and page.is_visible("#decimation")
            assert "thinned to %d evenly spaced" % M in page.inner_text("#decimation")
            s0 = scatter_points(page)
            assert s0["key"] == "0/mlp.neurons" and s0["n"] == M and s0["types"][0] == "scatter3d"
            assert sorted(s0["ids"]) == list(range(M))
            page.focus("#layer")
            page.keyboard.press("ArrowRight")
            page.wait_for_function("document.getElementById('scatter').getAttribute('data-key') === '1/mlp.neurons'")
            s1 = scatter_points(page)
            assert s1["n"] == M and s1["x"] != s0["x"]
            assert "one layer in every" in page.inner_text("#trace-missing")     # layer 1's trace was left out
            page.select_option("#site", "attn.out")
            assert scatter_points(page)["n"] == 4096
            page.select_option("#site", "mlp.neurons")
            page.fill("#layer", "0")
            page.dispatch_event("#layer", "input")
            c0 = scatter_points(page)["colors"]
            page.focus("#token")
            page.keyboard.press("ArrowRight")
            assert page.get_attribute("#tokens .tok.cur", "data-t") == "1"
            assert scatter_points(page)["colors"] != c0                          # coloured by token 1 now
            assert page.get_attribute("#heatmap-img", "src").startswith("data:image/png;base64,")
            assert errors == []
        finally:
            page.close()

        # the note's advice works: one layer shows every neuron; a smaller budget still holds
        one = load_page_data(npp.view(run, tmp_path / "one.html", layers="5"))
        assert one["projections"]["layers"] == [5] and one["projections"]["decimation"] is None
        assert one["projections"]["points"]["5/mlp.neurons"]["M"] == 14336
        assert (tmp_path / "one.html").stat().st_size <= 20 * 2**20
        small = npp.view(run, tmp_path / "small.html", max_mb=8)
        assert small.stat().st_size <= 8 * 2**20 and load_page_data(small)["projections"]["points"]
    finally:
        shutil.rmtree(run, ignore_errors=True)     # a 57 GiB sparse file: not left for the next reader
