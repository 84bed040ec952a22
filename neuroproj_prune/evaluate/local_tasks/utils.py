"""Local-file datasets for the lm-eval tasks in this folder (offline rolling-loglikelihood perplexity).

The tasks read the plain files of `shared/data/` (wikitext2-test.txt, c4-train-sample-1000.jsonl,
tinyshakespeare.txt) through `custom_dataset`, not `dataset_path: json` with a relative `data_files`,
because a relative path in a task YAML is resolved against the current directory, not the YAML. Where
the files are found, first match wins:

1. `data_dir` in the task metadata (`TaskManager(metadata={"data_dir": ...})`, or
   `lm_eval --metadata '{"data_dir": "..."}'`);
2. the environment variable `NEUROPROJ_DATA_DIR`;
3. `shared/data` next to any folder above this file or the current directory (a clean clone sits beside
   `shared/`; an installed wheel run from one finds it too).

Each file becomes a `test` split of documents (field `text`), cut so that joining them gives back the
file's text exactly (the same text `neuroproj-prune eval --data FILE` scores):
- wikitext2: one document per article (a top-level ` = Title = ` heading line starts an article), 62;
- c4: one document per JSON line (its `text` field), 1000;
- shakespeare: consecutive speeches grouped into documents of about 8,000 characters, cut at blank lines.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

FILES = {
    "wikitext2": "wikitext2-test.txt",
    "c4": "c4-train-sample-1000.jsonl",
    "shakespeare": "tinyshakespeare.txt",
}
SHAKESPEARE_CHUNK_CHARS = 8000
_WIKI_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def data_dir(data_dir: str | os.PathLike | None = None, **_ignored) -> Path:
    """The folder that holds the shared data files (see the module docstring for the search order)."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("NEUROPROJ_DATA_DIR"):
        return Path(os.environ["NEUROPROJ_DATA_DIR"]).expanduser()
    for parent in [*Path(__file__).resolve().parents, Path.cwd(), *Path.cwd().parents]:
        cand = parent / "shared" / "data"
        if (cand / FILES["wikitext2"]).is_file() or (cand / FILES["c4"]).is_file():
            return cand
    raise FileNotFoundError(
        "shared/data not found next to the repository; set NEUROPROJ_DATA_DIR or pass metadata data_dir")


def data_file(name: str, **kwargs) -> Path:
    path = data_dir(**kwargs) / FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found (set NEUROPROJ_DATA_DIR or metadata data_dir)")
    return path


# ----------------------------------------------------------------------------------- documents
def split_wikitext(text: str) -> list[str]:
    """One document per article; the text before the first heading (blank lines) joins the first one."""
    starts = [m.start() for m in _WIKI_HEADING.finditer(text)]
    if not starts:
        return [text]
    starts[0] = 0
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def split_chunks(text: str, chars: int = SHAKESPEARE_CHUNK_CHARS) -> list[str]:
    """Consecutive pieces of about `chars` characters, each ending just after a blank line when possible."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + chars)
        end = len(text) if end < 0 else end + 2
        docs.append(text[start:end])
        start = end
    return docs


def read_jsonl(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def documents(name: str, **kwargs) -> list[str]:
    path = data_file(name, **kwargs)
    if name == "c4":
        return read_jsonl(path)
    text = path.read_text(encoding="utf-8")
    return split_wikitext(text) if name == "wikitext2" else split_chunks(text)


def _dataset(name: str, **kwargs):
    import datasets

    docs = documents(name, **kwargs)
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": docs})})


# ------------------------------------------------------------------ lm-eval hooks (!function utils.x)
def load_wikitext2(**kwargs):
    return _dataset("wikitext2", **kwargs)


def load_c4(**kwargs):
    return _dataset("c4", **kwargs)


def load_shakespeare(**kwargs):
    return _dataset("shakespeare", **kwargs)


def doc_to_target(doc) -> str:
    return doc["text"]


def count_words(text: str) -> int:
    """Whitespace-separated words (lm-eval's default `re.split(r"\\s+")` also counts empty ends)."""
    return len(text.split())


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, count_words(text)),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
