"""Run a GGUF file in llama.cpp, in-process through the PyPI wheel `xllamacpp` (llama.cpp's server).

Used to check exports against transformers (greedy continuations, next-token log-probs, perplexity) and
to measure speed. Requests are the server's own JSON (`/completion`), with token ids as the prompt so
that both runtimes see the same tokens; `tokenize` checks the GGUF's own tokenizer separately.
"""
from __future__ import annotations

import json
import math

from ..errors import NeuroprojError, missing_extra


def _xllamacpp():
    try:
        import xllamacpp
    except ImportError:
        raise missing_extra("xllamacpp", "running GGUF files in llama.cpp") from None
    return xllamacpp


class LlamaCpp:
    """One llama.cpp server on a GGUF file: `complete`, `logprobs_next`, `tokenize`, `hidden`.
    `threads`: CPU threads; `ctx`: context length per slot; `parallel`: slots (batch of sequences);
    `precise`: float32 KV cache and no flash attention (agreement checks: on SmolLM2 the next-token log-probs
    move from ~4e-3 to ~1e-4 of transformers'); False: llama.cpp's defaults (f16 KV, flash attention auto).
    `quiet`: llama.cpp's own log off (its errors still come back in the answers)."""

    def __init__(self, gguf_path, *, threads: int = 2, ctx: int = 1024, parallel: int = 1, embedding: bool = False,
                 batch: int = 512, precise: bool = True, quiet: bool = False):
        xlc = _xllamacpp()
        p = xlc.CommonParams()
        p.model.path = str(gguf_path)
        p.n_ctx = ctx * parallel
        p.n_parallel = parallel
        p.n_batch = batch
        p.n_ubatch = batch
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = False
        if quiet:
            p.verbosity = -1
        if precise:
            p.cache_type_k = p.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
            p.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.embedding = embedding
        if embedding:
            p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
        self.server = xlc.Server(p)

    def complete(self, prompt, n_predict: int, n_probs: int = 0, **extra) -> dict:
        """Greedy completion of `prompt` (text or token ids); the server's JSON answer."""
        req = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "n_probs": n_probs,
               "cache_prompt": False, **extra}
        r = self.server.handle_completions(req)
        if isinstance(r, dict) and "error" in r:
            raise NeuroprojError(f"llama.cpp: {r['error']}")
        return r

    def greedy(self, ids: list[int], n: int, n_probs: int = 0) -> tuple[list[int], list[dict]]:
        """(generated token ids, per generated token {id: logprob} of the top max(n_probs, 1)), from a prompt
        of token ids or a text (then the GGUF's own tokenizer splits it)."""
        r = self.complete(ids if isinstance(ids, str) else list(ids), n, n_probs=max(n_probs, 1))
        probs = r["choices"][0]["logprobs"]["content"]
        toks = [p["id"] for p in probs]
        top = [{t["id"]: t["logprob"] for t in p.get("top_logprobs", [])} for p in probs]
        return toks, top

    def address(self) -> str:
        a = self.server.listening_address
        a = a() if callable(a) else a
        return a if str(a).startswith("http") else f"http://{a}"

    def hidden(self, ids: list[int]):
        """Final-norm hidden states of every position (an `embedding=True` server, pooling none), (T, d)."""
        import numpy as np

        import urllib.request

        # the non-OAI /embedding endpoint of the in-process server (the OAI one refuses pooling none)
        req = urllib.request.Request(f"{self.address()}/embedding", data=json.dumps({"content": list(ids)}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as f:
            r = json.loads(f.read())
        if isinstance(r, dict) and "error" in r:
            raise NeuroprojError(f"llama.cpp: {r['error']}")
        data = r[0]["embedding"]
        return np.asarray(data, dtype=np.float32)


def perplexity_from_hidden(hidden, out_weight, ids) -> tuple[float, int]:
    """(Σ −log p(x_{t+1} | x_≤t), count) with logits = hidden · out_weightᵀ (the GGUF's output matrix)."""
    import numpy as np

    logits = hidden[:-1].astype(np.float64) @ out_weight.astype(np.float64).T
    m = logits.max(1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(logits - m).sum(1)))
    tgt = logits[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float((lse - tgt).sum()), len(ids) - 1


def output_weight(gguf_path):
    """The output matrix of a GGUF (`output.weight`, else the tied `token_embd.weight`), de-quantized by gguf-py."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors["token_embd.weight"]
    w = dequantize(t.data, t.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape(int(t.shape[1]), int(t.shape[0]))


def nll_to_ppl(total: float, count: int) -> float:
    return math.exp(total / max(count, 1))


def gguf_perplexity(path, windows: list[list[int]], threads: int = 2) -> float:
    """Perplexity of a GGUF in llama.cpp over token windows (each scored alone): final-norm hidden states from
    llama.cpp (float32 KV cache, no flash attention), logits with the GGUF's own output matrix (de-quantized by
    gguf-py, as llama.cpp stores it), exp(mean NLL of every next token). Cost: one forward per window."""
    ll = LlamaCpp(path, threads=threads, ctx=len(windows[0]), embedding=True, batch=len(windows[0]), precise=True)
    W = output_weight(path)
    nll, count = 0.0, 0
    for w in windows:
        t, c = perplexity_from_hidden(ll.hidden(w), W, w)
        nll, count = nll + t, count + c
    return nll_to_ppl(nll, count)
