"""Calibration and evaluation text: local `.txt`/`.jsonl` files or a `datasets` name, as token windows.

Data specs:
- `path.txt` — the whole file;
- `path.jsonl` — the field `text` of each line, documents joined with a blank line;
- `NAME[:CONFIG][@SPLIT]` — a `datasets` dataset (default split `train`), its `text` column.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NeuroprojError

DOC_SEPARATOR = "\n\n"


def shared_data_dir() -> Path | None:
    """Where the project's text lives: NEUROPROJ_DATA_DIR, else `shared/data` beside a folder above the package
    (a checkout sits beside `shared/`) or above the current directory (an installed wheel run from a checkout);
    None when not found."""
    if os.environ.get("NEUROPROJ_DATA_DIR"):
        return Path(os.environ["NEUROPROJ_DATA_DIR"]).expanduser()
    for parent in [*Path(__file__).resolve().parents, Path.cwd(), *Path.cwd().parents]:
        cand = parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


@dataclass
class TextSource:
    text: str
    description: str   # what was read, for metadata


def data_path(spec) -> Path:
    """The file a data spec names: the path as given, or — when a relative path does not exist from here — the
    file of that name in the shared data directory (`shared_data_dir`), so that a recipe's
    `../shared/data/c4-train-sample-1000.jsonl` resolves from any directory."""
    path = Path(str(spec)).expanduser()
    if not path.exists() and not path.is_absolute():
        shared = shared_data_dir()
        if shared is not None and (shared / path.name).is_file():
            return shared / path.name
    return path


def read_text(spec: str, max_chars: int | None = None) -> TextSource:
    """Read a data spec into one string (documents joined by a blank line)."""
    if not str(spec).strip():
        raise NeuroprojError("the data is empty: give a .txt or .jsonl file (field 'text') or a datasets name")
    path = data_path(spec)
    if path.suffix in (".txt", ".raw", ".jsonl", ".json") or path.exists():
        if path.is_dir():
            raise NeuroprojError(f"data {spec} is a directory: give a .txt or .jsonl file (field 'text') in it, or a "
                                 f"datasets name")
        if not path.is_file():
            raise NeuroprojError(f"data file {spec} not found")
        raw = path.read_bytes()
        try:
            if b"\x00" in raw:
                raise UnicodeDecodeError("utf-8", raw, 0, 1, "NUL byte")
            content = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise NeuroprojError(f"data file {spec} is not UTF-8 text (a binary file?): give a .txt or .jsonl "
                                 f"text file") from None
        if path.suffix in (".jsonl", ".json"):
            docs = []
            for n, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise NeuroprojError(f"{spec}:{n}: each line must be a JSON object with a 'text' field") from None
                if not isinstance(doc, str):
                    raise NeuroprojError(f"{spec}:{n}: the 'text' field must be a string, got {type(doc).__name__}")
                docs.append(doc)
            text = DOC_SEPARATOR.join(docs)
        else:
            text = content
        desc = f"{path.name} ({path.stat().st_size} bytes)"
    else:
        text, desc = _read_dataset(spec, max_chars)
    if max_chars is not None:
        text = text[:max_chars]
    if not text.strip():
        raise NeuroprojError(f"data {spec!r} holds no text")
    return TextSource(text, desc)


def _read_dataset(spec: str, max_chars: int | None) -> tuple[str, str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    split = split or "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (offline, unknown name, missing config)
        raise NeuroprojError(
            f"could not load dataset {spec!r} ({type(e).__name__}); offline, give a local .txt or .jsonl file"
        ) from None
    docs, total = [], 0
    for row in ds:
        docs.append(row["text"])
        total += len(row["text"])
        if max_chars is not None and total >= max_chars:
            break
    return DOC_SEPARATOR.join(docs), f"datasets:{name}:{config or '-'}@{split} ({len(docs)} docs)"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, one sequence (no special tokens added in the middle)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_samples(tokenizer, spec: str, samples: int = 128, seqlen: int = 512, seed: int = 0,
                        max_seqlen: int | None = None, holdout: int = 0) -> tuple[torch.Tensor, str]:
    """`samples` windows of `seqlen` tokens drawn from the concatenated, tokenized text.

    The text is cut into non-overlapping windows and `samples` of them are chosen at random (seed), so no
    token is used twice. Too little text is an error, never silent repetition. Returns (ids, description).
    `holdout` > 0: that many further windows of the same draw follow the `samples` ones (rows samples:),
    disjoint from them; the first `samples` rows are the same windows as without them.
    """
    if samples < 1 or seqlen < 2:
        raise NeuroprojError(f"need samples >= 1 and seqlen >= 2 (got {samples}, {seqlen})")
    if max_seqlen is not None and seqlen > max_seqlen:
        raise NeuroprojError(f"--seqlen {seqlen} exceeds the model's context of {max_seqlen} tokens")
    # datasets can be huge: read about 8 characters per needed token, with headroom for a random choice
    src = read_text(spec, max_chars=None if data_path(spec).exists() else 32 * samples * seqlen)
    ids = tokenize(tokenizer, src.text)
    windows = ids.numel() // seqlen
    if windows < samples + holdout:
        more = f" and {holdout} held-back windows" if holdout else ""
        raise NeuroprojError(
            f"data {spec!r} has {ids.numel()} tokens: too few for {samples} samples x {seqlen} tokens{more} "
            f"({(samples + holdout) * seqlen} needed); use fewer --samples, a shorter --seqlen or more text"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(windows, generator=g)
    pick = torch.cat([perm[:samples].sort().values, perm[samples:samples + holdout].sort().values])
    batch = ids[: windows * seqlen].view(windows, seqlen)[pick]
    desc = f"{src.description}: {samples}x{seqlen} tokens, seed {seed}, from {ids.numel()} tokens"
    return batch, desc


def eval_windows(tokenizer, spec: str, seqlen: int) -> tuple[torch.Tensor, str]:
    """The whole text tokenized once, cut into non-overlapping windows of `seqlen` (the tail shorter than a
    window is dropped, as in the GPTQ/SparseGPT/Wanda protocol). Returns (windows, description)."""
    src = read_text(spec)
    ids = tokenize(tokenizer, src.text)
    n = ids.numel() // seqlen
    if n < 1:
        raise NeuroprojError(f"data {spec!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen), src.description
