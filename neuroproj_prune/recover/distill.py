"""The `recover` stage: distil the dense model back into a pruned checkpoint, written in the input's format.

    lm, report = recover("runs/p30", "c4.jsonl", "runs/p30-rec", tokens=2_000_000)

Objective, per token t of a window (teacher logits z_t, student logits s_t, temperature T):

    loss = T² · KL(softmax(z_t / T) ‖ softmax(s_t / T))  +  lm_weight · CE(s_t, x_{t+1})

averaged over the tokens of a step (the KL over every position, the next-token cross-entropy over all but the
last). The teacher is the dense model the checkpoint was pruned from (`prune_summary.json` names it; `teacher`
overrides), loaded once, in eval mode and without gradients; the student (the pruned checkpoint) trains:
every parameter (`method=full`, AdamW) or low-rank adapters on the MLP projections (`method=lora`, peft;
merged into the weights at the end, so the output is a plain checkpoint again). Training windows come from
`data`, cut into non-overlapping windows of `seqlen` tokens; `eval_windows` of them (seeded) are held out and
never trained on: the student's held-out loss (the objective above), perplexity and KL to the teacher are
measured before training, every `eval_every` steps and after, and `keep=best` writes the weights with the
lowest held-out loss (the input's included: the output is never worse than the input on that measure),
`keep=last` the final ones. A token budget beyond the text repeats it in a fresh order each pass (the
summary reports the passes).

Cost, per training token: teacher forward ≈ 2·P_t FLOPs, student forward + backward ≈ 6·P_s (full) or ≈ 4·P_s
(LoRA: no weight gradients beside the adapters'), so ≈ 8·P per token for P_t ≈ P_s = P; 2M tokens on a 135M
model ≈ 2.2·10¹⁵ FLOPs (about a day at the 20-50 tokens/s measured on a shared 2-core CPU; minutes on one
GPU). Memory: full — 16 bytes per student parameter (float32 weights, gradients, two AdamW moments) plus the
teacher (4 bytes per parameter in float32, 2 in bfloat16); LoRA — 4 bytes per student parameter plus 16 per
adapter parameter; both plus activations and ≈ 4 float32 copies of the logits (batch_size · seqlen · vocab · 4
bytes each: student logits, their log-softmax and its gradient, the teacher's log-probabilities). `keep=best`
holds one more copy of the trained parameters in CPU memory (4 bytes per parameter).

Precision: `dtype=auto` is bfloat16 autocast on CUDA (teacher in bfloat16, student master weights float32)
and float32 on the CPU. The output is written in `save_dtype` (auto: the dtype of the input checkpoint's files).

Resume: every `save_every` steps `accelerate.Accelerator.save_state` writes model, optimizer, scheduler and
RNG states (safetensors and weights-only torch files) plus `progress.json` (step, loss curve, evaluations,
best step) and the best weights into `OUT/.recover_state`, atomically. A later call with the same input,
teacher, data and settings continues from it and ends with the same weights as an uninterrupted run; other
settings are refused (or, with `overwrite`, the state is discarded). The final checkpoint replaces OUT in
one rename, which also removes the state.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..io import atomic_dir, check_writable, file_sha256, stored_tensors
from ..model import (SAVE_DTYPES, LoadedModel, adapter_for, api_call, command, load_model, model_fingerprint, num_params,
                     resolve_device, save_dtype, save_pruned)
from ..stats import read_text, tokenize

STATE_DIR = ".recover_state"
STATE_FORMAT = "neuroproj-prune/recover-state/1"
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # → transformers names
DEFAULT_LR = {"full": 1e-4, "lora": 2e-4}


# -------------------------------------------------------------------------------------------- config
@dataclass
class RecoverConfig(Config):
    """Every setting of one recovery (CLI flags, the recipe's `recover` section, keywords of `recover()`)."""

    what = "recover"

    teacher: str | None = opt(None, "dense teacher model (default: the `model` recorded in PRUNED_DIR/"
                              "prune_summary.json)", kind=str)
    tokens: int = opt(2_000_000, "training token budget: steps = tokens // (seqlen * batch_size * grad_accum); "
                      "cost ~8 * parameters FLOPs per token", ge=1)
    seqlen: int = opt(512, "tokens per training window", ge=2)
    batch_size: int = opt(4, "windows per forward pass", ge=1)
    grad_accum: int = opt(2, "forward passes per optimizer step", ge=1)
    lr: float | None = opt(None, "peak learning rate of AdamW (default 1e-4 full, 2e-4 lora)", kind=float, gt=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", ge=0.0)
    warmup: float = opt(0.05, "share of the steps with a linear learning-rate warm-up, in [0, 1)", ge=0.0, lt=1.0)
    schedule: str = opt("cosine", "learning-rate decay after the warm-up", tuple(SCHEDULES))
    temperature: float = opt(1.0, "distillation temperature T: loss T^2 * KL(softmax(teacher/T) || softmax(student/T))", gt=0.0)
    lm_weight: float = opt(0.0, "weight of the next-token cross-entropy added to the KL (0: pure distillation)", ge=0.0)
    method: str = opt("full", "full (every parameter trains) or lora (low-rank adapters, merged at the end)",
                      ("full", "lora"))
    lora_rank: int = opt(16, "lora: adapter rank r", ge=1)
    lora_alpha: float = opt(32.0, "lora: scale alpha (the update is alpha/r * B A)", gt=0.0)
    lora_targets: str = opt("mlp", "lora: the modules adapted: mlp (every MLP projection, where the pruning "
                            "acted), all-linear, or a comma list of module names such as q_proj,v_proj")
    dtype: str = opt("auto", "auto (bfloat16 autocast on CUDA, float32 on CPU), float32 or bfloat16 (autocast; "
                     "the trained weights stay float32)", ("auto", "float32", "bfloat16"))
    seed: int = opt(0, "which windows are held out, the window order, the LoRA initialisation", ge=0)
    eval_every: int = opt(50, "steps between held-out evaluations (0: before and after training only)", ge=0)
    eval_windows: int = opt(16, "windows of the training text held out for evaluation (never trained on)", ge=1)
    keep: str = opt("best", "weights written: best (lowest held-out loss among the evaluations, the input "
                    "included) or last", ("best", "last"))
    save_every: int = opt(100, "steps between resumable states in OUT/.recover_state (0: none)", ge=0)
    save_dtype: str = opt("auto", "dtype of the written checkpoint: auto (that of PRUNED_DIR's files, which prune "
                          "wrote in the dense model's dtype), float32, bfloat16 or float16", SAVE_DTYPES)

    def check(self) -> None:
        if not self.lora_targets.strip(" ,"):
            raise ConfigError("lora_targets", "lora_targets is empty: give mlp, all-linear or module names")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def tokens_per_step(self) -> int:
        return self.seqlen * self.batch_size * self.grad_accum

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step


# ------------------------------------------------------------------------------------------- inputs
def _check_checkpoint(path: Path) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise NeuroprojError(f"{path} is not a checkpoint directory (no config.json): give the --out of "
                             f"`neuroproj-prune prune`")
    if not any(path.glob("*.safetensors")):
        raise NeuroprojError(f"{path} holds no .safetensors weights: give the --out of `neuroproj-prune prune`")


def _read_summary(path: Path) -> dict | None:
    f = path / "prune_summary.json"
    if not f.is_file():
        return None
    try:
        s = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise NeuroprojError(f"{f} is not readable JSON: the checkpoint is damaged; prune again") from None
    if not isinstance(s, dict):
        raise NeuroprojError(f"{f} must hold a JSON object")
    return s




def _check_out(out: Path, pruned: Path, overwrite: bool) -> None:
    """OUT may be absent, empty, hold only a resumable state, or anything with `overwrite`."""
    if out.resolve() == pruned.resolve():
        raise NeuroprojError("--out must differ from PRUNED_DIR (the input is read until the end)")
    if out.exists():
        if not out.is_dir():
            if not overwrite:
                raise NeuroprojError(f"output {out} exists and is not a directory: choose another --out or "
                                     f"pass --overwrite")
        elif any(p.name != STATE_DIR for p in out.iterdir()) and not overwrite:
            raise NeuroprojError(f"output {out} exists and is not empty: choose another --out or pass --overwrite")
    check_writable(out)


def _windows(tokenizer, data, cfg: RecoverConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(training windows, held-out windows, description): the text tokenized once, cut into non-overlapping
    windows of seqlen, `eval_windows` of them drawn with the seed for evaluation."""
    spec = str(data)
    is_file = Path(spec).expanduser().exists()
    need = cfg.tokens + cfg.eval_windows * cfg.seqlen
    src = read_text(spec, max_chars=None if is_file else 8 * need)  # datasets: ~8 characters per needed token
    ids = tokenize(tokenizer, src.text)
    n = ids.numel() // cfg.seqlen
    if n < cfg.eval_windows + 1:
        raise NeuroprojError(f"data {spec!r} has {ids.numel()} tokens: too few for {cfg.eval_windows} held-out "
                             f"windows and one training window of {cfg.seqlen} tokens; give more text, a shorter "
                             f"--seqlen or fewer --eval-windows")
    w = ids[: n * cfg.seqlen].view(n, cfg.seqlen)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    held, train = w[perm[:cfg.eval_windows].sort().values], w[perm[cfg.eval_windows:]]
    return train, held, f"{src.description}: {len(train)}x{cfg.seqlen} training + {len(held)} held-out windows"


def _data_id(data) -> str:
    p = Path(str(data)).expanduser()
    return f"sha256:{file_sha256(p)}" if p.is_file() else f"spec:{data}"


def _teacher_spec(cfg: RecoverConfig, summary: dict | None, pruned: Path) -> str:
    if cfg.teacher:
        return cfg.teacher
    if not summary or not summary.get("model"):
        raise NeuroprojError(f"{pruned} has no prune_summary.json naming its dense model: give --teacher MODEL")
    return str(summary["model"])


def _check_teacher(teacher: LoadedModel, student: LoadedModel, spec: str, summary: dict | None) -> None:
    """The teacher must be the dense model of the student: same architecture, vocabulary and tokenizer, and
    (unless the input was itself recovered, which trains them) the same embeddings, which pruning leaves alone."""
    tc, sc = teacher.model.config, student.model.config
    ta, sa = adapter_for(teacher.model), adapter_for(student.model)
    if tc.model_type != sc.model_type or ta.num_layers(teacher.model) != sa.num_layers(student.model) or \
            ta.hidden_size(teacher.model) != sa.hidden_size(student.model):
        raise NeuroprojError(f"teacher {spec!r} is another model ({tc.model_type}, {ta.num_layers(teacher.model)} "
                             f"layers) than the pruned one ({sc.model_type}, {sa.num_layers(student.model)} layers): "
                             f"give --teacher the model you pruned")
    t_emb, s_emb = teacher.model.get_input_embeddings().weight, student.model.get_input_embeddings().weight
    if t_emb.shape != s_emb.shape or tc.vocab_size != sc.vocab_size or \
            (teacher.tokenizer is not None and student.tokenizer is not None
             and teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab()):
        raise NeuroprojError(f"teacher {spec!r} has another vocabulary ({tc.vocab_size} tokens) than the pruned "
                             f"model ({sc.vocab_size}): the KL needs one vocabulary; give --teacher the model you "
                             f"pruned")
    if not (summary or {}).get("recover"):
        a, b = t_emb.detach().float().cpu(), s_emb.detach().float().cpu()
        if not torch.allclose(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max())):  # bfloat16 rounding passes
            raise NeuroprojError(f"teacher {spec!r} is not the dense model of this checkpoint (its embeddings "
                                 f"differ): give --teacher the model you pruned")


def _lora_targets(model, spec: str) -> list[str] | str:
    """peft's target_modules: full module names for `mlp`, peft's own `all-linear`, or the given names,
    refused when nothing in the model matches."""
    if spec == "all-linear":
        return spec
    names = {id(m): n for n, m in model.named_modules()}
    if spec == "mlp":
        a = adapter_for(model)
        return [names[id(m)] for i in range(a.num_layers(model)) for m in (*a.in_projs(model, i), a.out_proj(model, i))]
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children()) and n}
    missing = [t for t in wanted if t not in leaves and not any(n == t or n.endswith("." + t) for n in names.values())]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if hasattr(m, "weight") and getattr(m.weight, "dim", lambda: 0)() == 2 and n})
        raise NeuroprojError(f"lora targets {missing} match no module of this {model.config.model_type} model "
                             f"(its weight modules: {', '.join(linear)}); use mlp, all-linear or those names")
    return wanted


# --------------------------------------------------------------------------------------------- losses
def _kl(s_logits, t_logits, T: float) -> torch.Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over tokens, in float32."""
    V = s_logits.shape[-1]
    ls = F.log_softmax(s_logits.float().reshape(-1, V) / T, -1)
    lt = F.log_softmax(t_logits.float().reshape(-1, V) / T, -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean") * (T * T)


def _ce(s_logits, ids) -> torch.Tensor:
    V = s_logits.shape[-1]
    return F.cross_entropy(s_logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))


@torch.no_grad()
def _held_out(student, teacher, windows, cfg: RecoverConfig, acc, teacher_nll=False) -> dict:
    """On the held-out windows (token means): the student's NLL and perplexity, KL(teacher ‖ student) at T = 1,
    and `loss`, the training objective (T²·KL at the temperature + lm_weight·NLL) that `keep=best` minimises."""
    was = student.training
    student.eval()
    nll = kl = kl_t = tnll = 0.0
    batch_size, T = cfg.batch_size, cfg.temperature
    n_pred = n_tok = 0
    try:
        for i in range(0, len(windows), batch_size):
            x = windows[i:i + batch_size].to(acc.device)
            with acc.autocast():
                s = student(input_ids=x, use_cache=False).logits
                t = teacher(input_ids=x, use_cache=False).logits
            pred = x.shape[0] * (x.shape[1] - 1)
            nll += float(_ce(s, x)) * pred
            kl += float(_kl(s, t, 1.0)) * x.numel()
            kl_t += float(_kl(s, t, T)) * x.numel() if T != 1.0 else 0.0
            if teacher_nll:
                tnll += float(_ce(t, x)) * pred
            n_pred += pred
            n_tok += x.numel()
    finally:
        student.train(was)
    kl_t = kl if T == 1.0 else kl_t
    out = {"loss": kl_t / n_tok + cfg.lm_weight * nll / n_pred, "nll": nll / n_pred, "ppl": math.exp(nll / n_pred),
           "kl": kl / n_tok}
    if teacher_nll:
        out["teacher_nll"], out["teacher_ppl"] = tnll / n_pred, math.exp(tnll / n_pred)
    return out


def _order(n_train: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Window indices `start .. start+count` of the training stream: pass p is a permutation seeded by
    (seed, p), so the order of any step is known without replaying the ones before it (exact resume)."""
    out, pos = [], start
    while pos < start + count:
        p, off = divmod(pos, n_train)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + p + 1))
        take = min(n_train - off, start + count - pos)
        out.append(perm[off:off + take])
        pos += take
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- state
def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, params: dict[str, torch.Tensor]) -> None:
    mine = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in params.items():
            mine[n].copy_(v.to(mine[n].device, mine[n].dtype))


def _load_progress(state: Path) -> dict | None:
    f = state / "progress.json"
    if not f.is_file():
        return None
    try:
        p = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        p = None
    if not isinstance(p, dict) or p.get("format") != STATE_FORMAT or not (state / "accelerate").is_dir() or \
            not _state_files_whole(state):
        raise NeuroprojError(f"{state} is not a readable recover state (damaged or truncated files): delete it, or "
                             f"pass --overwrite to start over")
    return p


def _state_files_whole(state: Path) -> bool:
    """Whether every file of a saved state is whole, by what can be told without loading it: safetensors headers
    that fit their files (`io.stored_tensors`), torch's zip archives (optimizer, scheduler, RNG) with their
    central directory at the end. Cost: a header read per file."""
    for f in state.rglob("*"):
        if not f.is_file():
            continue
        if f.suffix == ".safetensors":
            try:
                stored_tensors(f)
            except NeuroprojError:
                return False
        elif f.suffix in (".bin", ".pkl", ".pt", ".pth") and not zipfile.is_zipfile(f):
            return False
    return True


def _mismatch(saved: dict, now: dict) -> list[str]:
    keys = sorted(set(saved) | set(now))
    flat = []
    for k in keys:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            flat += [f"{k}.{kk} {a.get(kk)!r} -> {b.get(kk)!r}" for kk in sorted(set(a) | set(b))
                     if a.get(kk) != b.get(kk)]
        elif a != b:
            flat.append(f"{k} {a!r} -> {b!r}")
    return flat


def _save_state(acc, state: Path, progress: dict, best: dict | None) -> None:
    """model/optimizer/scheduler/RNG (Accelerate) + progress.json + best weights, replaced in one rename."""
    from safetensors.torch import save_file

    with atomic_dir(state, overwrite=True) as tmp:
        acc.save_state(str(tmp / "accelerate"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1))


# ------------------------------------------------------------------------------------------------ API
def recover(pruned_dir, data, out, config: RecoverConfig | None = None, *, teacher_model: LoadedModel | None = None,
            overwrite: bool = False, device="auto", progress: bool = True, callback=None, log=None, **settings):
    """Distil the dense teacher into the pruned checkpoint `pruned_dir` on the text `data`; write the result
    to `out` in the input's format (standard checkpoint stays standard, a `neuroproj_prune` section stays) with
    `prune_summary.json` (the input's plus a `recover` section) and the input's `plan.json`.

    `config` (or RecoverConfig fields as keywords: `tokens=`, `lr=`, `method="lora"`, ...) says how;
    `teacher_model` passes an already loaded dense model (a recipe's) instead of loading `config.teacher`.
    `callback(step, record, model)` runs after every optimizer step, after that step's state was saved
    (`record`: the step's loss curve entry and `seconds` of training so far, which exclude the callbacks;
    `model`: the student being trained, e.g. for an outside evaluation). Returns (LoadedModel of the written
    checkpoint, the `recover` section). Formula, cost and resume: the module docstring.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    cfg = config.replace(**settings) if config is not None else RecoverConfig.make(**settings)
    if cfg.method == "lora":
        try:
            import peft  # noqa: F401 (checked before any work)
        except ImportError:
            raise NeuroprojError("--method lora needs the package peft: pip install peft") from None
    pruned, out = Path(pruned_dir), Path(out)
    log = log or (lambda msg: print(msg, flush=True) if progress else None)
    _check_checkpoint(pruned)
    _check_out(out, pruned, overwrite)
    if cfg.steps < 1:
        raise NeuroprojError(f"tokens {cfg.tokens} is less than one step of seqlen x batch_size x grad_accum = "
                             f"{cfg.tokens_per_step} tokens: raise --tokens or lower those")
    dev = resolve_device(device)
    if dev.type == "cuda" and (dev.index or 0) != 0:
        raise NeuroprojError(f"device {device!r}: recover runs on the first visible GPU; choose it with "
                             f"CUDA_VISIBLE_DEVICES={dev.index} and --device cuda")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and dev.type == "cuda")
    summary = _read_summary(pruned)
    plan_text = (pruned / "plan.json").read_text() if (pruned / "plan.json").is_file() else None
    stored = save_dtype(cfg.save_dtype, str(pruned))   # auto: the dtype of the input's files
    t_spec = teacher_model.spec if teacher_model is not None else _teacher_spec(cfg, summary, pruned)

    # -- inputs, all checked before anything is written
    student = load_model(str(pruned), dtype="float32", device="cpu")   # float32 master weights
    if student.tokenizer is None:
        raise NeuroprojError(f"{pruned} holds no tokenizer: the checkpoint is incomplete; prune again")
    train_w, held_w, data_desc = _windows(student.tokenizer, data, cfg)
    if teacher_model is not None:
        teacher = teacher_model
    else:
        try:
            teacher = load_model(t_spec, dtype="bfloat16" if bf16 else "float32", device=str(dev))
        except NeuroprojError as e:
            raise NeuroprojError(f"teacher {t_spec!r}: {e}; give --teacher MODEL (the model you pruned)") from None
    _check_teacher(teacher, student, t_spec, summary)
    teacher.model.eval().requires_grad_(False)
    targets = _lora_targets(student.model, cfg.lora_targets) if cfg.method == "lora" else None
    trained = {k: v for k, v in cfg.to_dict().items() if k != "save_dtype"}   # what the state's weights depend on
    identity = {"config": trained, "input": student.fingerprint,
                "teacher": teacher.fingerprint or model_fingerprint(teacher.model), "data": _data_id(data)}
    state = out / STATE_DIR
    try:
        saved = _load_progress(state) if out.is_dir() else None
    except NeuroprojError:
        if not overwrite:
            raise
        saved = None   # a damaged state, given up with --overwrite (removed below)
    if saved is not None and saved["identity"] != identity:
        if not overwrite:
            diff = "; ".join(_mismatch(saved["identity"]["config"], identity["config"])
                             + [k for k in ("input", "teacher", "data") if saved["identity"][k] != identity[k]])
            raise NeuroprojError(f"{state} was made by another recovery ({diff}): rerun with its settings to "
                                 f"resume, or pass --overwrite to start over")
        saved = None
    if saved is None and state.exists():
        shutil.rmtree(state)   # another run's state, given up with --overwrite
    if out.exists() and not out.is_dir():
        out.unlink()           # a file in the way, given up with --overwrite (the state goes under OUT/)

    # -- the student as a trainable module
    torch.manual_seed(cfg.seed)   # LoRA's initialisation (a resumed run loads the saved adapters instead)
    model = student.model
    model.requires_grad_(True)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets, bias="none"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    acc = Accelerator(cpu=dev.type == "cpu", mixed_precision="bf16" if bf16 else "no",
                      gradient_accumulation_steps=cfg.grad_accum)
    opt_ = torch.optim.AdamW(trainable, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    steps = cfg.steps
    sched = get_scheduler(SCHEDULES[cfg.schedule], opt_, num_warmup_steps=int(round(cfg.warmup * steps)),
                          num_training_steps=steps)
    model, opt_, sched = acc.prepare(model, opt_, sched)
    teacher.model.to(acc.device)
    n_train = len(train_w)
    passes = steps * cfg.batch_size * cfg.grad_accum / n_train
    if passes > 1:
        log(f"[recover] the budget of {cfg.tokens:,} tokens is {passes:.2f} passes over the "
            f"{n_train * cfg.seqlen:,} training tokens of {data}: windows repeat (in a new order each pass)")

    # -- start or resume
    best_params = None
    if saved is not None:
        try:
            acc.load_state(str(state / "accelerate"))
            if (state / "best.safetensors").is_file():
                from safetensors.torch import load_file

                best_params = load_file(str(state / "best.safetensors"))
        except Exception as e:  # noqa: BLE001 - torch, safetensors and accelerate each raise their own on a damaged file
            raise NeuroprojError(f"{state} does not load ({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
                                 f"delete it, or pass --overwrite to start over") from None
        prog = saved
        log(f"[recover] resuming {state} at step {prog['step']} of {steps}")
    else:
        before = _held_out(model, teacher.model, held_w, cfg, acc, teacher_nll=True)
        prog = {"format": STATE_FORMAT, "identity": identity, "step": 0, "tokens": 0, "seconds": 0.0,
                "curve": {"step": [], "tokens": [], "loss": [], "kl": [], "ce": [], "lr": []},
                "evals": [{"step": 0, "tokens": 0, **before}], "best": {"step": 0, "loss": before["loss"]}}
        if cfg.keep == "best":
            best_params = _trainable(acc.unwrap_model(model))
    created = not out.exists()

    bar = tqdm(total=steps, initial=prog["step"], desc="recover", unit="step", disable=not progress,
               dynamic_ncols=True)
    t_run = time.perf_counter()
    seconds0, t_callbacks = prog["seconds"], 0.0   # the clock counts training and held-out evaluations only
    try:
        while prog["step"] < steps:
            t0 = time.perf_counter()
            step = prog["step"]
            micro = cfg.batch_size
            idx = _order(n_train, cfg.seed, step * cfg.grad_accum * micro, cfg.grad_accum * micro)
            tot = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
            for g in range(cfg.grad_accum):
                x = train_w[idx[g * micro:(g + 1) * micro]].to(acc.device)
                with acc.accumulate(model):
                    with torch.no_grad(), acc.autocast():
                        t_logits = teacher.model(input_ids=x, use_cache=False).logits
                    s_logits = model(input_ids=x, use_cache=False).logits
                    kl = _kl(s_logits, t_logits, cfg.temperature)
                    ce = _ce(s_logits, x) if cfg.lm_weight else torch.zeros((), device=kl.device)
                    loss = kl + cfg.lm_weight * ce
                    if not torch.isfinite(loss):
                        raise NeuroprojError(f"the recovery loss is not finite at step {step + 1}: lower --lr "
                                             f"(now {cfg.peak_lr}) or use --dtype float32")
                    acc.backward(loss)
                    opt_.step()
                    sched.step()
                    opt_.zero_grad(set_to_none=True)
                del t_logits, s_logits
                for k, v in (("loss", loss), ("kl", kl), ("ce", ce)):
                    tot[k] += float(v.detach()) / cfg.grad_accum
            step += 1
            prog["step"], prog["tokens"] = step, step * cfg.tokens_per_step
            c = prog["curve"]
            for k, v in (("step", step), ("tokens", prog["tokens"]), ("loss", tot["loss"]), ("kl", tot["kl"]),
                         ("ce", tot["ce"] if cfg.lm_weight else None), ("lr", sched.get_last_lr()[0])):
                c[k].append(v)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == steps:
                ev = _held_out(model, teacher.model, held_w, cfg, acc)
                prog["evals"].append({"step": step, "tokens": prog["tokens"], **ev})
                if ev["loss"] < prog["best"]["loss"]:
                    prog["best"] = {"step": step, "loss": ev["loss"]}
                    if cfg.keep == "best":
                        best_params = _trainable(acc.unwrap_model(model))
            prog["seconds"] = seconds0 + time.perf_counter() - t_run - t_callbacks
            if cfg.save_every and step % cfg.save_every == 0 and step < steps:
                _save_state(acc, state, prog, best_params)
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{tot['loss']:.4f}", tok_s=f"{cfg.tokens_per_step / dt:,.0f}")
            bar.update(1)
            if callback is not None:
                t_cb = time.perf_counter()
                record = {**{k: v[-1] for k, v in c.items()}, "seconds": prog["seconds"]}
                callback(step, record, acc.unwrap_model(model))
                t_callbacks += time.perf_counter() - t_cb
    except BaseException:
        bar.close()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    bar.close()

    # -- the weights kept, merged and written in the input's format
    final = acc.unwrap_model(model)
    del model, opt_, sched
    acc.free_memory()   # the optimizer's moments (8 bytes per trained parameter) before the copy that is written
    kept_step = prog["step"] if cfg.keep == "last" else prog["best"]["step"]
    if cfg.keep == "best" and best_params is not None:
        _restore(final, best_params)
    if cfg.method == "lora":
        final = final.merge_and_unload()
    final = final.to("cpu", stored).eval()
    final.requires_grad_(False)
    evals = prog["evals"]
    after = next(e for e in evals if e["step"] == kept_step) if cfg.keep == "best" else evals[-1]
    first = evals[0]
    gap = first["ppl"] - first["teacher_ppl"]
    report = {
        "teacher": t_spec, "data": data_desc, "method": cfg.method, "config": cfg.to_dict(), "lr": cfg.peak_lr,
        "steps": prog["step"], "tokens_seen": prog["tokens"], "passes": round(passes, 3), "kept": cfg.keep,
        "kept_step": kept_step, "precision": "bfloat16 autocast" if bf16 else "float32", "device": str(acc.device),
        "seconds": round(prog["seconds"], 1),
        "flops_estimate": (8 if cfg.method == "full" else 6) * num_params(final) * prog["tokens"],
        "held_out": {"windows": len(held_w), "seqlen": cfg.seqlen, "teacher_ppl": first["teacher_ppl"],
                     "ppl_before": first["ppl"], "ppl_after": after["ppl"], "kl_before": first["kl"],
                     "kl_after": after["kl"],
                     "gap_closed": (first["ppl"] - after["ppl"]) / gap if gap > 0 else None},
        "evals": evals, "loss_curve": prog["curve"], "save_dtype": str(stored).replace("torch.", ""),
        "command": command(api_call("npp.recover", str(pruned), data if isinstance(data, str) else str(data),
                                    str(out), **cfg.changed())),
    }
    new_summary = dict(summary or {})
    if new_summary.get("recover"):
        report["previous"] = new_summary["recover"]   # a recovered checkpoint recovered again
    new_summary["recover"] = report
    extra = {"plan.json": plan_text} if plan_text is not None else None
    save_pruned(final, student.tokenizer, out, summary=new_summary, extra_files=extra, overwrite=True)
    ho = report["held_out"]
    log(f"[recover] {prog['tokens']:,} tokens in {report['seconds']} s: held-out perplexity {ho['ppl_before']:.3f} -> "
        f"{ho['ppl_after']:.3f} (teacher {ho['teacher_ppl']:.3f}; kept step {kept_step}); wrote {out}")
    return LoadedModel(final, student.tokenizer, str(out), model_fingerprint(final)), report

