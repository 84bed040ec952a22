"""Shared fixtures: tiny random models of every supported family, an offline tokenizer, the real data.

Everything here is offline: the hub is disabled, tiny models are built from configs, the tokenizer is a
byte-level BPE trained on a slice of tinyshakespeare with the `tokenizers` library.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
C4 = DATA / "c4-train-sample-1000.jsonl"
WIKI = DATA / "wikitext2-test.txt"
SHAKESPEARE = DATA / "tinyshakespeare.txt"

VOCAB = 384
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt", "gpt_neox"]


def make_tokenizer():
    """A byte-level BPE (vocab 384) trained on the first 200 kB of tinyshakespeare, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = SHAKESPEARE.read_text()[:200_000]
    tok.train_from_iterator([text[i:i + 1000] for i in range(0, len(text), 1000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_config(family: str, layers: int = 3, hidden: int = 32, inter: int = 64):
    import transformers as tf

    common = dict(vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config,
               "phi3": tf.Phi3Config}[family]
        kw = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=hidden // 4, **common)
        if family == "phi3":
            kw.pop("head_dim")
        return cls(**kw)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_inner=inter, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=512,
                             bos_token_id=0, eos_token_id=0)
    if family == "opt":
        return tf.OPTConfig(hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers, num_attention_heads=4,
                            word_embed_proj_dim=hidden, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                num_attention_heads=4, **common)
    raise ValueError(family)


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, **kw):
    """A tiny random model; init scaled up (std 0.2) so activations are far from zero and correlated."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    cfg.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


def gqa_llama(dtype=torch.float32, seed: int = 0, layers: int = 4):
    """A tiny llama with grouped-query attention: 6 query heads of 8 channels in 2 key/value groups (hidden 48,
    MLP 96); init std 0.2 as `tiny_model`."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=0.2)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run on one thread: for many tiny ops, thread hand-offs cost more than they save (and on a
    shared 2-core machine, ×30 more). Tests marked `slow` (the real model) keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """Factory: save a tiny model of `family` with the offline tokenizer; returns the directory."""
    made = {}

    def make(family="llama", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"tiny-{family}")
            tiny_model(family, **kw).save_pretrained(d)
            tokenizer.save_pretrained(d)
            made[key] = d
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (float32, de-quantized from the pip-installed GGUF), loaded once."""
    import neuroproj_prune as npp

    return npp.load_model("smollm2-135m", dtype="float32", device="cpu")
