"""Perplexity by the standard protocol — the GPTQ / SparseGPT / Wanda / FLAP one.

The whole text is tokenized once (no special tokens), cut into non-overlapping windows of `seqlen` tokens (the
tail shorter than a window is dropped), and every window is scored independently, with no context carried
over. The first token of a window has nothing to condition on, so each window predicts `seqlen - 1` tokens:

    T = windows * (seqlen - 1),   NLL = sum over windows and positions of -log p(x_t | x_<t in the window)
    perplexity = exp(NLL / T)

This is exactly the number the usual reference code computes (`loss * seqlen` summed, divided by
`windows * seqlen`, where `loss` is the mean over the `seqlen - 1` shifted positions: the factors `seqlen`
cancel). It is normalised per *token of this model's tokenizer*, so it compares models that share a
tokenizer, at the same `seqlen`. (lm-eval's rolling tasks normalise per word or byte instead: harness.py.)
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from ..errors import NeuroprojError
from ..model import LoadedModel, context_length
from ..stats.data import eval_windows, shared_data_dir

DEFAULT_SEQLEN = 2048
DEFAULT_EVAL_FILE = "wikitext2-test.txt"
LOGITS_BUDGET = 1 << 28          # float32 logits elements per forward pass (1 GiB) for the default batch size
TOKENS_BUDGET = 8192             # tokens per forward pass for the default batch size


def default_eval_data() -> str:
    """The standard perplexity text: shared/data/wikitext2-test.txt."""
    d = shared_data_dir()
    if d is None or not (d / DEFAULT_EVAL_FILE).is_file():
        raise NeuroprojError(f"no evaluation text given and shared/data/{DEFAULT_EVAL_FILE} not found: pass --data FILE")
    return str(d / DEFAULT_EVAL_FILE)


def model_context(model) -> int | None:
    """The model's maximum sequence length (None when its config does not say); see `Adapter.context_length`."""
    return context_length(model)


def default_batch_size(seqlen: int, vocab: int) -> int:
    """Windows per forward pass: about 8k tokens, and the float32 logits within 1 GiB."""
    return max(1, min(TOKENS_BUDGET // seqlen, LOGITS_BUDGET // max(1, seqlen * vocab)))


def _unpack(model, tokenizer=None):
    """(model, tokenizer, name, fingerprint) from a LoadedModel, a (model, tokenizer) pair or a bare model."""
    if isinstance(model, LoadedModel):
        return model.model, tokenizer or model.tokenizer, model.spec, model.fingerprint
    if isinstance(model, (tuple, list)) and len(model) == 2:
        model, tokenizer = model[0], tokenizer or model[1]
    if tokenizer is None:
        raise NeuroprojError("perplexity needs a tokenizer: pass a LoadedModel, (model, tokenizer) or tokenizer=")
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return model, tokenizer, name, None


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------- perplexity
def perplexity(model, tokenizer=None, data=None, *, seqlen: int | None = None, max_windows: int | None = None,
               batch_size: int | None = None, progress: bool = True) -> dict:
    """Perplexity of a causal LM on a text, by the standard non-overlapping-window protocol.

    Call as `perplexity(loaded, data)` (a `LoadedModel`, or a `(model, tokenizer)` pair) or
    `perplexity(model, tokenizer, data)`. `data`: a `.txt`/`.jsonl` path or `datasets` name (see data.py;
    None: shared/data/wikitext2-test.txt), a 1-D LongTensor of token ids (cut into windows), or a 2-D
    LongTensor of ready windows (`seqlen` = its width).

    Protocol (see the module docstring): the whole text tokenized once, non-overlapping windows of
    `seqlen` (default min(2048, the model's context)), tail dropped, each window scored on its own; the
    first token of every window is not predicted, so `tokens = windows * (seqlen - 1)`;
    `value = exp(nll)`, `nll` = mean token NLL (accumulated in float64). `max_windows` keeps the *first*
    K windows (a quick look, reported as `max_windows` with `windows_total`).

    Batched (`batch_size` windows per forward pass, default ~8k tokens), under `torch.inference_mode`, on
    the model's device; the result does not depend on the batch size beyond float rounding.
    Returns {value, nll, seqlen, windows, tokens, data, windows_total, [max_windows], batch_size, seconds, protocol}.
    """
    if data is None and tokenizer is not None and isinstance(tokenizer, (str, os.PathLike, torch.Tensor)):
        data, tokenizer = tokenizer, None          # perplexity(loaded, data)
    model, tokenizer, _, _ = _unpack(model, tokenizer)
    ctx = model_context(model)
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        if seqlen is not None and seqlen != data.shape[1]:
            raise NeuroprojError(f"seqlen {seqlen} differs from the width {data.shape[1]} of the given windows")
        seqlen = data.shape[1]
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, ctx) if ctx else DEFAULT_SEQLEN
    if seqlen < 2:
        raise NeuroprojError(f"seqlen must be at least 2 (got {seqlen})")
    if ctx is not None and seqlen > ctx:
        raise NeuroprojError(f"seqlen {seqlen} exceeds the model's context of {ctx} tokens")
    if max_windows is not None and max_windows < 1:
        raise NeuroprojError(f"max_windows must be at least 1 (got {max_windows})")

    if data is None:
        data = default_eval_data()
    if isinstance(data, torch.Tensor):
        ids = data.long().cpu()
        if ids.dim() == 1:
            n = ids.numel() // seqlen
            if n < 1:
                raise NeuroprojError(f"{ids.numel()} tokens are fewer than one window of {seqlen}")
            ids = ids[: n * seqlen].view(n, seqlen)
        elif ids.dim() != 2:
            raise NeuroprojError("token data must be a 1-D id sequence or a 2-D (windows, seqlen) tensor")
        windows, desc = ids, f"given tokens ({ids.numel()})"
    else:
        windows, desc = eval_windows(tokenizer, str(data), seqlen)
    total = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    n = windows.shape[0]
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    bs = batch_size or default_batch_size(seqlen, vocab)
    if bs < 1:
        raise NeuroprojError(f"batch_size must be at least 1 (got {bs})")

    device = _device_of(model)
    nll_sum = torch.zeros((), dtype=torch.float64)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"perplexity ({seqlen} tokens/window)", unit="window", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, bs):
                batch = windows[start:start + bs].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                for row in range(batch.shape[0]):      # one (seqlen, vocab) log-softmax at a time
                    nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum")
                    nll_sum += nll.double().cpu()
                del logits
                bar.update(batch.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    tokens = n * (seqlen - 1)
    mean = float(nll_sum) / tokens
    if not math.isfinite(mean):
        raise NeuroprojError("the model's loss is not finite (NaN/inf logits): its weights hold NaN/inf, or it "
                             "overflows in its dtype (try --dtype float32)")
    out = {
        "value": math.exp(mean),
        "nll": mean,
        "seqlen": seqlen,
        "windows": n,
        "tokens": tokens,
        "data": desc,
        "windows_total": total,
        "batch_size": bs,
        "seconds": round(time.perf_counter() - t0, 3),
        "protocol": "whole text tokenized once (no special tokens), non-overlapping windows, tail dropped, "
                    "each window scored independently, seqlen-1 predicted tokens per window, exp(mean token NLL)",
    }
    if max_windows is not None and max_windows < total:
        out["max_windows"] = max_windows
    return out


# ------------------------------------------------------------------------------------------ lm-eval


# ------------------------------------------------------------------------------------------ evaluate


