"""AGRPO: policy gradients for masked diffusion language models, in one file.

Reference implementation of "Simple Policy Gradients for Reasoning with Diffusion Language Models"
(A. Zhan, arXiv 2510.04019). The method comes first, in the order of the paper's argument; the plumbing after:

  0. Config            every hyperparameter, the authors' settings as defaults
  1. Loading           LLaDA-8B-Instruct (or an offline toy model), plain LoRA
  2. Sampler           generation as a Markov decision process over denoising steps
  3. Advantages        rewards (reward.py) and group-relative advantages
  4. Policy gradient   the amortized Monte Carlo estimator, importance sampling over timesteps
  5. Training loop     the authors' recipe, on one GPU or many (torchrun)
  6. Evaluation        decoding of the test split (the authors': greedy) at one or several step counts
  7. Runs              a directory a run, atomic checkpoints, exact resume, Ctrl-C, curves, export
  8. Command line      flags, config files, the toy preset, clear errors, main

Sections 0 and 2-5 hold the method, about 580 lines; a first reading can stop after 5. The toy supervised
warm-up (end of section 1) is not part of AGRPO: it only gives the CPU demo a model that earns some reward.

`python agrpo.py --help` explains every flag; `python agrpo.py --task countdown --model toy --device cpu`
runs the whole method offline on a CPU and shows it learning.
"""
import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

import reward


# ----------------------------------------------------------------------------------------------------------
# 0. Config: every hyperparameter, the authors' settings as defaults
def arg(default, help, group=None):
    """A field of Args: its default and its --help text; `group` starts a new --help section at this field."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class Args:
    task: Literal["countdown", "gsm8k", "math500", "sudoku"] = arg(
        "countdown", "Task to train on (reward.py).", group="task and model")
    model: str = arg("GSAI-ML/LLaDA-8B-Instruct", "Hub id or local path of a masked diffusion LM; 'toy' builds "
                     "a tiny one offline and changes the defaults marked 'toy' to a CPU-sized run.")
    data: Literal["hub", "synthetic"] = arg("hub", "Where examples come from: the paper's hub data sets, or "
                                            "seeded offline generators (countdown, sudoku).")
    toy_warmup_steps: int = arg(2000, "--model toy only, not part of AGRPO: supervised masked-diffusion steps "
                                "that give the random toy a start that earns reward; cached under "
                                "$XDG_CACHE_HOME/agrpo (0: none).")
    gsm8k_test: Literal["platinum", "openai"] = arg(
        "platinum", "GSM8K test set: madrylab/gsm8k-platinum (the authors' choice, label errors fixed) or "
                    "openai/gsm8k.")
    device: str = arg("cuda", "Torch device: cuda, cuda:N or cpu.")
    dtype: Literal["bfloat16", "float32"] = arg("bfloat16", "Model weights' dtype.")
    mask_token_id: int = arg(126336, "Id of the mask token (LLaDA: 126336).")
    eos_token_id: Optional[int] = arg(None, "Id of EOS; default: the model config's.")
    train_examples: int = arg(0, "Train on the first N training examples only (0: all).")
    seed: int = arg(333, "Seed of every random draw.")
    lora_rank: int = arg(64, "LoRA rank r; 0 trains all weights.", group="LoRA (the authors' adapters)")
    lora_alpha: float = arg(64.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input.")
    lora_targets: str = arg("q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out",
                            "Comma-separated names of the linear layers that get adapters (LLaDA's names).")
    learning_rate: float = arg(5e-6, "AdamW peak learning rate.", group="optimisation")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.99, "AdamW beta2.")
    weight_decay: float = arg(0.01, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Gradient-norm clip.")
    warmup_ratio: float = arg(0.01, "Share of the schedule warmed up linearly before the cosine decay.")
    num_train_epochs: float = arg(5.0, "Passes over the training prompts (sets the number of steps).")
    max_steps: Optional[int] = arg(None, "Training steps; default: as many as --num-train-epochs takes.")
    prompts_per_step: int = arg(16, "Prompts per training step, over all processes (the authors: 16).")
    micro_batch_size: int = arg(8, "Completions per forward pass on one process (gradients accumulate).")
    update_schedule: Literal["paper", "released"] = arg(
        "paper", "'paper': one optimizer update per batch. 'released': as the authors' released trainer runs, "
                 "accumulate every micro-batch but a process's last, then update after each of its M sampled "
                 "steps (see README).")
    group_size: int = arg(8, "Completions per prompt, G.", group="rollouts (generation as a denoising MDP)")
    completion_length: int = arg(384, "Completion length C.")
    block_length: int = arg(12, "Semi-autoregressive block length BL.")
    sampling_steps: int = arg(128, "Denoising steps T; each reveals C/T tokens.")
    unmasking: Literal["random", "low_confidence"] = arg("random", "Which masked positions a step reveals.")
    temperature: float = arg(0.6, "Sampling temperature (> 0 for training).")
    top_p: float = arg(0.99, "Nucleus truncation of the support (1 = off).")
    top_k: int = arg(150, "Top-k truncation of the support (0 = off).")
    mc_samples: int = arg(24, "Sampled timesteps M per completion.", group="the estimator and the objective")
    importance_sampling: Literal["entropy", "uniform"] = arg("entropy", "Distribution q over timesteps.")
    low_discrepancy: bool = arg(True, "Stratify the batch's uniforms before the inverse CDF of q.")
    epsilon: float = arg(0.2, "PPO clip range eps.")
    beta: float = arg(0.0, "Weight of the k3 KL to the reference (adapters off; needs --lora-rank > 0).")
    num_iterations: int = arg(1, "Gradient steps per batch of rollouts.")
    scale_rewards: Literal["none", "std"] = arg("none", "'std' divides advantages by the group std (GRPO); "
                                                "the authors only centre them.")
    activation_checkpointing: bool = arg(False, "Recompute activations in the backward pass (saves memory).")
    eval_every: int = arg(0, "Evaluate every N steps, at the start and at the end (0: never).",
                          group="evaluation (the authors': greedy, low-confidence, C=256 in blocks of 32)")
    eval_only: bool = arg(False, "Only evaluate (the bare model, or the one restored by --resume).")
    eval_sampling_steps: str = arg("128", "Comma-separated step counts T to evaluate at, e.g. 128,64,32.")
    eval_completion_length: int = arg(256, "Completion length C for evaluation.")
    eval_block_length: int = arg(32, "Block length BL for evaluation.")
    eval_unmasking: Literal["random", "low_confidence"] = arg("low_confidence", "Unmasking for evaluation.")
    eval_temperature: float = arg(0.0, "Temperature for evaluation (0 = greedy).")
    eval_batch_size: int = arg(16, "Test prompts per forward pass.")
    eval_examples: int = arg(0, "Evaluate on the first N test examples only (0: all).")
    output_dir: Optional[str] = arg(None, "The run's directory; default: a new runs/<task>-<date>-<time>.",
                                    group="runs and checkpoints")
    save_every: int = arg(15, "Save a checkpoint every N steps (and at the end; 0: only at the end).")
    keep_checkpoints: int = arg(3, "Keep the newest N checkpoints.")
    resume: Optional[str] = arg(None, "Continue a run with its saved settings (flags typed here override them): "
                                "'latest' (the newest run under runs/, or --output-dir), a run directory or a "
                                "checkpoint directory.")
    export: Optional[str] = arg(None, "Write the model (adapters merged, transformers format) to this new "
                                "directory and exit; with --resume, the trained one.")

    @property
    def eval_steps(self):
        return [int(t) for t in self.eval_sampling_steps.split(",")]


# `--model toy`: a CPU-sized run of a few minutes. These are its defaults; a flag typed on the command line still
# wins. It evaluates, at the start and the end, the policy it trains (sampled at the training temperature, random
# unmasking): AGRPO improves what the policy samples; greedy decoding of a model this small barely moves.
TOY = dict(data="synthetic", device="cpu", dtype="float32", mask_token_id=2, lora_rank=0, learning_rate=6e-4,
           max_steps=300, prompts_per_step=8, group_size=8, micro_batch_size=32, completion_length=24,
           block_length=8, sampling_steps=12, mc_samples=4, top_k=0, top_p=1.0, temperature=1.0, eval_every=300,
           eval_completion_length=24, eval_block_length=8, eval_sampling_steps="12", eval_unmasking="random",
           eval_temperature=1.0, eval_batch_size=64)


def check_geometry(C, BL, T, flags=("--completion-length", "--block-length", "--sampling-steps")):
    """C/BL blocks, each revealed in T/(C/BL) steps of k = C/T tokens: raise ValueError naming the fix."""
    if min(C, BL, T) <= 0 or C % BL or T % (C // BL) or BL % (T // (C // BL)):
        raise ValueError(f"{flags[0]} {C}, {flags[1]} {BL}, {flags[2]} {T} do not fit: C must be a multiple of "
                         "BL, T a multiple of the number of blocks C/BL, and each block's BL tokens must split "
                         "evenly over its T/(C/BL) steps (e.g. C=384, BL=12, T=128)")


# ----------------------------------------------------------------------------------------------------------
# 1. Loading
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x), with W frozen and B = 0 at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        self.dropout = nn.Dropout(dropout)
        # float32 even for a bf16 model: updates of lr 5e-6 would vanish in bf16 rounding
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        y = self.base(x)
        if self.enabled:  # float32 master weights, computed in the activations' dtype
            y = y + (self.dropout(x) @ self.lora_A.to(x.dtype).T @ self.lora_B.to(x.dtype).T) * self.scale
        return y

    def merged(self) -> nn.Linear:
        self.base.weight.data += (self.lora_B @ self.lora_A).to(self.base.weight.dtype) * self.scale
        return self.base


def add_lora(model, args):
    """Freeze the model and wrap every linear layer named in --lora-targets (no peft needed)."""
    targets = set(args.lora_targets.split(","))
    model.requires_grad_(False)
    hits = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not hits:
        raise ValueError(f"no linear layer of the model is named any of {sorted(targets)}; set --lora-targets")
    tied = [name for name, m in hits if m.weight is model.get_input_embeddings().weight]
    if tied:  # merging an adapter into a tied output layer would change the input embeddings too
        raise ValueError(f"{tied[0]} shares its weight with the input embeddings; leave it out of --lora-targets")
    for name, module in hits:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child,
                LoRALinear(module, args.lora_rank, args.lora_alpha, args.lora_dropout))
    return model


@contextlib.contextmanager
def adapters_off(model):
    """The reference policy of the KL term: the base model, its adapters switched off."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in loras:
        m.enabled = False
    try:
        yield
    finally:
        for m in loras:
            m.enabled = True


def merge_lora(model):
    """Fold the adapters into the weights, for export as a plain transformers model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def toy_model_and_tokenizer(seed: int):
    """A tiny random bidirectional masked LM (BERT-shaped) and a character tokenizer, built offline. Numbers of
    up to three digits and the answer tags are whole tokens, so the toy can copy them; decoding gives back the
    same text. Toy prompts are the bare question: the chat template drops the system message, whose worked
    examples a model this small cannot use (the real path sends it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<mask>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars, tags = [chr(c) for c in range(32, 127)] + ["\n"], ["<answer>", "</answer>"]
    numbers = [f"{i:0{n}d}" for n in (2, 3) for i in range(10 ** n)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars + tags + numbers)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?<![0-9])[0-9]{1,3}(?![0-9])|[\s\S]"), "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_tokens(tags)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>", unk_token="<unk>",
        additional_special_tokens=specials[4:], padding_side="left",
        chat_template="{% for m in messages if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    torch.manual_seed(seed)
    # 8 heads and weights wider than BERT's 0.02: the warm-up learns to copy numbers within its 2,000 steps for
    # every seed tried (with 4 heads, some seeds had not started to)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=96, num_hidden_layers=2, num_attention_heads=8,
                        intermediate_size=384, max_position_embeddings=1024, pad_token_id=0, initializer_range=0.1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    return BertForMaskedLM(config), tokenizer


def toy_answer(task, example):
    """A solved completion, in the format reward.py grades in full."""
    if task == "countdown":
        return f"<answer>{reward.solve_countdown(example['nums'], example['target'])} = {example['target']}</answer>"
    return f"<answer>{example['answer']}</answer>"


def warm_up_toy(model, tokenizer, args, batch=32, lr=2e-3):
    """Not part of AGRPO: a short supervised start, so that the random toy model earns some reward and the
    policy gradient has something to work on. It is LLaDA's own pre-training objective, masked diffusion, on
    solved synthetic problems: each answer, padded with EOS to C, gets a fraction t of its tokens masked (t
    stratified over the batch), and the model predicts them, the loss weighted by 1/t. AdamW, linear decay.
    The weights are cached on disk, keyed by everything that determines them, and written atomically."""
    C, steps = args.completion_length, args.toy_warmup_steps
    key = repr((args.task, args.seed, steps, C, args.mask_token_id, args.eos_token_id, batch, lr,
                model.config.to_json_string(), tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template))
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agrpo",
                        f"toy-{args.task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return
    n = min(steps * batch, reward.SYNTHETIC_TRAIN_SIZE)
    examples = reward.load_examples(args.task, "train", "synthetic", n=n, seed=args.seed)
    answers = tokenizer([toy_answer(args.task, ex) for ex in examples], add_special_tokens=False)["input_ids"]
    answers = torch.tensor([(ids + [args.eos_token_id] * C)[:C] for ids in answers])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(args.seed)
    positions = torch.arange(C).expand(batch, -1)
    for _ in tqdm(range(steps), desc="toy warm-up (not AGRPO)", disable=world()[0] > 0, leave=False):
        rows = torch.randint(len(examples), (batch,), generator=generator)
        prompt, prompt_mask = (v.cpu() for v in tokenize_prompts(tokenizer, [examples[i] for i in rows], args))
        x0 = answers[rows]
        t = ((torch.randperm(batch, generator=generator) + torch.rand(batch, generator=generator)) / batch)
        t = t.clamp_min(1e-3)[:, None]
        masked = torch.rand(x0.shape, generator=generator) < t
        x = torch.cat([prompt, x0.masked_fill(masked, args.mask_token_id)], 1)
        logits = logits_at(model, x, with_completion(prompt_mask, C), prompt.shape[1] + positions)
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none") * masked / t
        (loss.sum() / x0.numel()).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(model.state_dict(), f"{path}.{os.getpid()}.tmp")
        os.replace(f"{path}.{os.getpid()}.tmp", path)  # a reader never sees half a file
    except OSError as e:
        say(f"the toy warm-up is not cached ({e.strerror}: {e.filename}); the next run repeats it")


def pretrained_class(name):
    """AutoModel for LLaDA's remote code (its config maps AutoModel to the LM), AutoModelForMaskedLM for any
    other masked LM, such as one --export wrote. Fails fast when the model is neither here nor reachable."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"--model {name}: the directory holds no config.json; give a model directory or a hub id")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=True, local_files_only=True)
    except OSError:  # not on this machine: ask the hub once, before transformers retries it for a minute
        import huggingface_hub
        try:
            huggingface_hub.model_info(name, timeout=10)
        except Exception as e:
            if getattr(e, "response", None) is None:  # no answer at all
                raise ValueError(f"--model {name} is not on this machine and the Hugging Face Hub cannot be "
                                 f"reached ({type(e).__name__}); check the network, or use --model toy for an "
                                 "offline run") from None
        config = AutoConfig.from_pretrained(name, trust_remote_code=True)
    return AutoModel if "AutoModel" in (getattr(config, "auto_map", None) or {}) else AutoModelForMaskedLM


def load_model_and_tokenizer(args):
    """LLaDA-8B-Instruct (remote code, bf16), a model this program exported, or the toy model; fills
    args.eos_token_id. Raises ValueError, one sentence, when the model cannot be loaded."""
    dtype = getattr(torch, args.dtype)
    if args.model == "toy":
        model, tokenizer = toy_model_and_tokenizer(args.seed)
    else:
        from transformers import AutoTokenizer
        try:
            model_class = pretrained_class(args.model)
            tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True, padding_side="left")
            model = model_class.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
        except (OSError, ImportError) as e:
            raise ValueError(f"could not load --model {args.model} ({str(e).strip().splitlines()[0][:200]}); "
                             "check the name, the network or HF_HOME, or use --model toy for an offline run") from None
    if args.eos_token_id is None:
        args.eos_token_id = model.config.eos_token_id if model.config.eos_token_id is not None \
            else tokenizer.eos_token_id
    vocabulary = model.get_input_embeddings().num_embeddings
    if args.mask_token_id >= vocabulary:
        raise ValueError(f"--mask-token-id {args.mask_token_id} is not in the model's vocabulary of {vocabulary}; "
                         f"set it (the tokenizer's mask token is {tokenizer.mask_token_id})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.model == "toy" and args.toy_warmup_steps:
        warm_up_toy(model, tokenizer, args)
    model = model.to(device=args.device, dtype=dtype)
    return (add_lora(model, args) if args.lora_rank > 0 else model), tokenizer


# ----------------------------------------------------------------------------------------------------------
# 2. Masked diffusion sampler: generation as a Markov decision process over denoising steps
@dataclass
class Rollout:
    """B completions of length C and, per completion token, what the policy gradient needs."""
    prompt_ids: torch.Tensor             # (B, P) left-padded prompts
    prompt_mask: Optional[torch.Tensor]  # (B, P) 1 on real prompt tokens (None: no padding in the batch)
    tokens: torch.Tensor                 # (B, C) completion ids
    step: torch.Tensor                   # (B, C) denoising step t that revealed the token; T: EOS filler
    positions: torch.Tensor              # (B, T, k) the k positions revealed at each step
    logp: torch.Tensor                   # (B, C) log pi_old(token | s_t), truncated and tempered
    entropy: torch.Tensor                # (B, C) entropy of that distribution
    support: Optional[torch.Tensor]      # (B, C, K) candidate ids, most probable first (None: no truncation)
    support_size: torch.Tensor           # (B, C) the support S_i is support[..., :support_size]

    def __getitem__(self, rows):
        return Rollout(*(None if v is None else v[rows] for v in dataclasses.astuple(self)))


def unwrap(model):
    """The model itself, inside a DistributedDataParallel wrapper or not."""
    return getattr(model, "module", model)


def with_completion(prompt_mask, C, rows=slice(None)):
    """The attention mask of prompt + completion, or None when no prompt is padded: LLaDA turns any mask into
    an additive bias (ruling out fused attention kernels) and checks it on the host every forward."""
    if prompt_mask is None:
        return None
    mask = prompt_mask[rows]
    return torch.cat([mask, mask.new_ones(mask.shape[0], C)], 1)


def logits_at(model, input_ids, attention_mask, positions):
    """Logits (B, n, V) at `positions` (B, n) only: the output layer is fed just those hidden states, so the
    full (B, length, V) logits tensor is never built. Works for any model whose output layer is a module."""
    head = unwrap(model).get_output_embeddings()
    if head is None or isinstance(head, nn.Embedding):  # tied through F.linear: slice the full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))

    def keep_positions(_, inputs):
        hidden = inputs[0]
        return (hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])),) + inputs[1:]

    handle = head.register_forward_pre_hook(keep_positions)
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        handle.remove()


def truncated_logits(logits, args):
    """softmax(logits / temperature) restricted to S_i: top-k, then top-p on the renormalised top-k.
    Returns the candidates' tempered logits (-inf outside S_i), their ids, and |S_i|. With top-p alone the
    candidates are cut to the widest nucleus of the batch, never the whole vocabulary."""
    z = logits.float() / args.temperature
    V = z.shape[-1]
    K = min(args.top_k, V) if args.top_k > 0 else V
    if K == V and args.top_p >= 1:  # no truncation: the support is the whole vocabulary
        return z, torch.arange(V, device=z.device).expand_as(z), torch.full(z.shape[:-1], V, device=z.device)
    z, ids = z.topk(K, dim=-1)
    if args.top_p < 1:  # keep the most probable tokens while their cumulative mass is <= top_p (at least one)
        size = (z.softmax(-1).cumsum(-1) <= args.top_p).sum(-1).clamp_min(1)
        if args.top_k == 0:
            K = int(size.max())  # one host sync a step, only on this path
            z, ids = z[..., :K], ids[..., :K]
    else:
        size = torch.full(z.shape[:-1], K, device=z.device)
    z = z.masked_fill(torch.arange(K, device=z.device) >= size[..., None], -math.inf)
    return z, ids, size


class Draw(typing.NamedTuple):
    """One denoising step's draw at every position of the current block (R rows, BL positions)."""
    tokens: torch.Tensor        # (R, BL) sampled ids
    logp: torch.Tensor          # (R, BL) their log-probs under the truncated, tempered distribution
    entropy: torch.Tensor       # (R, BL) that distribution's entropy
    support: torch.Tensor       # (R, BL, K) its candidate ids, most probable first
    support_size: torch.Tensor  # (R, BL) how many of them it keeps
    confidence: torch.Tensor    # (R, BL) what low_confidence unmasking ranks: logp (greedy: the model's)


def sample_tokens(logits, args, generator):
    """Sample every position from its truncated, tempered distribution with float64 Gumbel-max."""
    if args.temperature == 0:  # greedy (evaluation): a point mass, ranked by the model's own log-prob
        confidence, tokens = logits.float().log_softmax(-1).max(-1)
        zeros = torch.zeros_like(confidence)
        return Draw(tokens, zeros, zeros, tokens[..., None], torch.ones_like(tokens), confidence)
    z, ids, size = truncated_logits(logits, args)
    logq = z.log_softmax(-1)
    u = torch.rand(z.shape, dtype=torch.float64, device=z.device, generator=generator)
    pick = (z.double() - (-u.log()).log()).argmax(-1, keepdim=True)  # -log(-log u) is Gumbel noise: + it
    logp = logq.gather(-1, pick).squeeze(-1)
    return Draw(ids.gather(-1, pick).squeeze(-1), logp, torch.special.entr(logq.exp()).sum(-1), ids, size, logp)


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, args, generator=None) -> Rollout:
    """Semi-autoregressive masked diffusion: C/BL blocks left to right, T denoising steps in all, each one
    forward pass that reveals k = C/T tokens of the current block; records what the policy gradient needs."""
    B, P = prompt_ids.shape
    C, BL, T = args.completion_length, args.block_length, args.sampling_steps
    check_geometry(C, BL, T)
    blocks, k = C // BL, C // T
    steps_per_block = T // blocks
    dev = prompt_ids.device
    x = torch.cat([prompt_ids, torch.full((B, C), args.mask_token_id, device=dev)], 1)
    prompt_mask = None if prompt_mask.all() else prompt_mask  # unpadded: no mask, so fused attention kernels
    step = torch.full((B, C), T, device=dev)
    positions = torch.zeros(B, T, k, dtype=torch.long, device=dev)
    logp, entropy = torch.zeros(B, C, device=dev), torch.zeros(B, C, device=dev)
    V = unwrap(model).get_input_embeddings().num_embeddings
    truncated = args.temperature > 0 and (args.top_p < 1 or 0 < args.top_k < V)
    support = torch.zeros(B, C, 0, dtype=torch.long, device=dev) if truncated else None  # widened as needed
    support_size = torch.ones(B, C, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)  # rows still generating
    t = 0
    for b in range(blocks):
        lo, hi = b * BL, (b + 1) * BL
        block = torch.arange(P + lo, P + hi, device=dev).expand(len(rows), -1)
        for _ in range(steps_per_block):
            # 1. one forward pass on s_t; 2. a draw at every position of the block
            draw = sample_tokens(logits_at(model, x[rows], with_completion(prompt_mask, C, rows), block), args,
                                 generator)
            # 3. k positions still masked (a sampled mask id counts as revealed): the most confident, or random
            priority = draw.confidence if args.unmasking == "low_confidence" else \
                torch.rand(draw.confidence.shape, device=dev, generator=generator)
            j = priority.masked_fill(step[rows, lo:hi] < T, -math.inf).topk(k, dim=-1).indices  # (R, k)
            # 4. reveal them, and record what the policy gradient needs
            r = rows[:, None]
            x[r, P + lo + j] = draw.tokens.gather(1, j)
            step[r, lo + j], positions[rows, t] = t, lo + j
            logp[r, lo + j], entropy[r, lo + j] = draw.logp.gather(1, j), draw.entropy.gather(1, j)
            support_size[r, lo + j] = draw.support_size.gather(1, j)
            if support is not None:
                K = draw.support.shape[-1]
                support = nn.functional.pad(support, (0, max(K - support.shape[-1], 0)))
                support[r, lo + j, :K] = draw.support.gather(1, j[..., None].expand(-1, -1, K))
            t += 1
        # 5. a block that came out all EOS ends its row; the rest becomes EOS filler, never an action
        done = (x[rows, P + lo:P + hi] == args.eos_token_id).all(-1)
        x[rows[done], P + hi:] = args.eos_token_id
        rows = rows[~done]
        if len(rows) == 0:
            break
    return Rollout(prompt_ids, prompt_mask, x[:, P:], step, positions, logp, entropy, support, support_size)


# ----------------------------------------------------------------------------------------------------------
# 3. Rewards (reward.py) and group-relative advantages
def grade(tokenizer, completions, examples, args):
    """Decode completions (N, C) and grade each with reward.py: a dict with the parts of the shaped reward
    ("format", "correct"), the evaluation score ("score", is_correct), the answer the grader read and the text."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [dict(reward.reward_parts(args.task, text, ex), score=reward.is_correct(args.task, text, ex), text=text)
            for text, ex in zip(texts, examples)]


def group_advantages(rewards, group_size, scale="none"):
    """A_i = R_i - mean of its group of G (the authors'); 'std' also divides by the group's standard deviation
    (GRPO's). With the group mean as baseline, E[A_i grad log p_i] = (1 - 1/G) grad J."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "std":
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.flatten()


# ----------------------------------------------------------------------------------------------------------
# 4. The amortized Monte Carlo policy gradient, with importance sampling over timesteps
def trajectory_length(rollout, args):
    """L = (last step that revealed a non-EOS token) + 1; 0 for a completion of nothing but EOS."""
    real = rollout.step.masked_fill(rollout.tokens == args.eos_token_id, -1)
    return real.max(1).values + 1


def sample_timesteps(rollout, L, args, generator=None):
    """Draw M steps per completion from q over 0..L-1 and return them with weights 1 / (L q(t)).
    q is uniform, or proportional to the entropy revealed at each step; the B*M uniforms are stratified
    (randperm + U) / (B*M) when low_discrepancy is on. Completions with L = 0 get weight 0."""
    B, M, T, dev = L.numel(), args.mc_samples, args.sampling_steps, L.device
    u = torch.rand(B * M, dtype=torch.float64, device=dev, generator=generator)
    if args.low_discrepancy:
        u = (torch.randperm(B * M, device=dev, generator=generator) + u) / (B * M)
    live = torch.arange(T, device=dev) < L[:, None]  # steps 0..L-1
    if args.importance_sampling == "entropy":
        mass = torch.zeros(B, T, dtype=torch.float64, device=dev)
        # the EOS filler (step T) lands on step T - 1 with entropy 0: it adds no mass
        mass.scatter_add_(1, rollout.step.clamp(max=T - 1), rollout.entropy.double())
        mass = (mass + 1e-8) * live  # + 1e-8: q(t) > 0 on every live step, as unbiasedness needs
    else:
        mass = live.double()
    q = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    t = torch.searchsorted(q.cumsum(1), u.view(B, M))  # the inverse CDF of q
    t = t.clamp(max=(L - 1).clamp_min(0)[:, None])  # a u that rounding puts past the last cumulative sum
    weight = torch.where(L[:, None] > 0, 1 / (L[:, None] * q.gather(1, t)).clamp_min(1e-30), 0.0)
    return t, weight.float()


def step_logprobs(model, rollout, t, args):
    """log pi(x_i | s_t) of the k tokens each completion revealed at its step t (B,), under the recorded
    support and temperature. s_t is rebuilt by re-masking every token revealed at step >= t (the EOS
    filler included, it is marked with step T). Returns log-probs and positions, both (B, k)."""
    pos = rollout.positions[torch.arange(len(t), device=t.device), t]
    state = rollout.tokens.masked_fill(rollout.step >= t[:, None], args.mask_token_id)
    ids = torch.cat([rollout.prompt_ids, state], 1)
    attention = with_completion(rollout.prompt_mask, state.shape[1])
    z = logits_at(model, ids, attention, rollout.prompt_ids.shape[1] + pos).float() / args.temperature
    token = rollout.tokens.gather(1, pos)
    if rollout.support is not None:
        K = rollout.support.shape[-1]
        cand = z.gather(-1, rollout.support.gather(1, pos[..., None].expand(-1, -1, K)))
        outside = torch.arange(K, device=z.device) >= rollout.support_size.gather(1, pos)[..., None]
        norm = cand.masked_fill(outside, -math.inf).logsumexp(-1)
    else:
        norm = z.logsumexp(-1)
    return z.gather(-1, token[..., None]).squeeze(-1) - norm, pos


def agrpo_loss(model, rollout, advantages, args, generator=None, prompts=1, sync=True, after_backward=None):
    """AGRPO's policy gradient for one micro-batch: sample M timesteps per completion, and for each rebuild
    s_t, recompute the log-probs of the tokens revealed at t, form the PPO-clipped term (plus beta times the
    k3 KL to the reference) and back-propagate at once, so memory stays flat in M.
    Under DDP the gradients are all-reduced in the last backward pass only, and only if `sync`; with
    `after_backward` (called after every backward: the released trainer's optimizer updates) in each one.
    Returns metrics."""
    M, G, k = args.mc_samples, args.group_size, args.completion_length // args.sampling_steps
    L = trajectory_length(rollout, args)
    t, weight = sample_timesteps(rollout, L, args, generator)
    adv = advantages[:, None].expand(-1, k)
    sums = {name: torch.zeros((), device=L.device) for name in ("loss", "clip_low", "clip_high", "kl")}
    ratio_max_dev = torch.zeros((), device=L.device)
    raw = unwrap(model)
    for m in range(M):
        all_reduce = sync and (m == M - 1 or after_backward is not None)
        with contextlib.nullcontext() if all_reduce or raw is model else model.no_sync():
            logp, pos = step_logprobs(model, rollout, t[:, m], args)
            ratio = (logp - rollout.logp.gather(1, pos)).exp()
            term = -torch.min(ratio * adv, ratio.clamp(1 - args.epsilon, 1 + args.epsilon) * adv)
            if args.beta > 0:
                with torch.no_grad(), adapters_off(raw):
                    ref = step_logprobs(raw, rollout, t[:, m], args)[0]
                kl = (ref - logp).exp() - (ref - logp) - 1
                # times r: tokens drawn from pi_old, so E_old[r grad k3] is the gradient of KL(pi || ref)
                term = term + args.beta * kl * ratio
                sums["kl"] += kl.detach().mean() / M
            # The loss: each completion's M weighted samples estimate its step average (1/L) sum_t of the
            # terms of the tokens revealed at t; / G averages the group; / prompts averages this process's
            # prompt groups (and DDP averages the processes): the step's gradient is a mean over its prompts.
            loss = (term * weight[:, m, None]).sum() / (M * G * prompts)
            loss.backward()
        if after_backward is not None:
            after_backward()
        with torch.no_grad():
            sums["loss"] += loss
            sums["clip_low"] += ((ratio < 1 - args.epsilon) & (adv < 0)).float().mean() / M
            sums["clip_high"] += ((ratio > 1 + args.epsilon) & (adv > 0)).float().mean() / M
            ratio_max_dev = torch.maximum(ratio_max_dev, (ratio - 1).abs().max())
    return dict(zip([*sums, "ratio_max_dev"], torch.stack([*sums.values(), ratio_max_dev]).tolist()))


# ----------------------------------------------------------------------------------------------------------
# 5. Training loop: the authors' recipe, on one GPU or many (torchrun)
def world():
    """(rank, number of processes); torchrun starts one process per GPU."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def keyed_seed(args, *key):
    """A seed fixed by (seed, *key). Every draw of a step is keyed by the step and the global index of the
    micro-batch, so results do not depend on the number of GPUs and a resumed run needs no RNG state."""
    return random.Random(str((args.seed, *key))).getrandbits(63)


def keyed_generator(args, *key):
    return torch.Generator(args.device).manual_seed(keyed_seed(args, *key))


def synchronize(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def prompt_texts(tokenizer, examples, args):
    return [tokenizer.apply_chat_template(reward.prompt_messages(args.task, ex), add_generation_prompt=True,
                                          tokenize=False) for ex in examples]


def tokenize_prompts(tokenizer, examples, args):
    enc = tokenizer(prompt_texts(tokenizer, examples, args), padding=True, padding_side="left",
                    add_special_tokens=False, return_tensors="pt")
    return enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def prompts_at(examples, seed, position, count):
    """Prompts number position .. position + count - 1 of an endless stream that visits the examples in a
    fresh seeded order every epoch."""
    return [examples[epoch_order(len(examples), seed, p // len(examples))[p % len(examples)]]
            for p in range(position, position + count)]


class Stop(Exception):
    """Ctrl-C or SIGTERM came (stop_on_signals): raised where stopping loses at most the step in progress."""


STOP_SIGNALS = []


def check_stop(args):
    """Raise Stop if a signal came, to this process or (under DDP) to any: all pass the same checks."""
    stop = bool(STOP_SIGNALS)
    if world()[1] > 1:
        flag = torch.tensor(float(stop), device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag)
    if stop:
        raise Stop


def rl_step(model, tokenizer, optimizer, schedule, batch, args, step):
    """One AGRPO step on this process's share of whole prompt groups: generate G completions per prompt, grade
    them, then num_iterations gradient steps. A Stop comes only before the first optimizer update, so an
    abandoned step leaves the model and the optimizer as they were. Returns the step's metrics."""
    rank, world_size = world()
    batch = batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]
    G, mb, raw = args.group_size, args.micro_batch_size, unwrap(model)
    examples = [ex for ex in batch for _ in range(G)]
    first = rank * len(examples) // mb  # global index of this process's first micro-batch
    clock = time.perf_counter()
    raw.eval()
    rollouts = []
    for i in range(0, len(examples), mb):
        check_stop(args)
        rollouts.append(generate(raw, *tokenize_prompts(tokenizer, examples[i:i + mb], args), args,
                                 keyed_generator(args, step, 0, first + i // mb)))
    synchronize(args)
    seconds = {"generate": time.perf_counter() - clock}

    clock = time.perf_counter()
    graded = grade(tokenizer, torch.cat([r.tokens for r in rollouts]), examples, args)
    rewards = torch.tensor([g["format"] + g["correct"] for g in graded])
    advantages = group_advantages(rewards, G, args.scale_rewards).to(args.device)
    seconds["grade"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norms = []

    def update():
        grad_norms.append(nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for iteration in range(args.num_iterations):
        losses = []  # the metrics of the last iteration are the ones reported
        for i, rollout in enumerate(rollouts):
            if iteration == 0:
                check_stop(args)
            last = i == len(rollouts) - 1
            released = last and args.update_schedule == "released"  # an update after every sampled step
            losses.append(agrpo_loss(model, rollout, advantages[i * mb:(i + 1) * mb], args,
                                     keyed_generator(args, step, 1 + iteration, first + i), prompts=len(batch),
                                     sync=last, after_backward=update if released else None))
        if args.update_schedule == "paper":
            update()  # one update per batch, as the paper describes
        schedule.step()  # once per iteration in both schedules: the released one's updates share one rate
    synchronize(args)
    seconds["train"] = time.perf_counter() - clock

    spread = rewards.view(-1, G).std(1)
    mean = lambda key: sum(g[key] for g in graded) / len(graded)
    metrics = {"reward": rewards.mean(), "reward_format": mean("format"), "reward_correct": mean("correct"),
               "accuracy": mean("score"), "reward_std": spread.mean(), "zero_spread_groups": (spread == 0).double()
               .mean(), "advantage_abs": advantages.abs().mean(), "advantage_min": advantages.min(),
               "advantage_max": advantages.max(), "completion_length": torch.cat(
                   [(r.tokens != args.eos_token_id).sum(1) for r in rollouts]).double().mean(),
               "loss": sum(m["loss"] for m in losses), "grad_norm": torch.stack(grad_norms).mean(),
               "lr": schedule.get_last_lr()[0], **{f"seconds_{k}": v for k, v in seconds.items()}}
    metrics.update({k: sum(m[k] for m in losses) / len(losses) for k in ("clip_low", "clip_high", "kl")})
    metrics = mean_over_ranks(metrics, args)
    metrics["ratio_max_dev"] = max_over_ranks(max(m["ratio_max_dev"] for m in losses), args)
    metrics["tokens_per_second"] = (args.prompts_per_step * G * args.completion_length /  # all processes'
                                    sum(metrics[f"seconds_{k}"] for k in seconds))
    if args.device.startswith("cuda"):
        metrics["peak_memory_gb"] = max_over_ranks(torch.cuda.max_memory_allocated() / 1e9, args)
    return metrics


def mean_over_ranks(metrics, args):
    """The metrics as plain floats, averaged over processes."""
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64, device=args.device)
    if world()[1] > 1:
        dist.all_reduce(values)
        values /= world()[1]
    return dict(zip(metrics, values.tolist()))


def max_over_ranks(value, args):
    value = torch.tensor(float(value), dtype=torch.float64, device=args.device)
    if world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def train(model, tokenizer, train_examples, test_examples, args):
    """The loop: AGRPO steps, evaluations, metrics and checkpoints, from the start or from --resume."""
    from transformers import get_cosine_schedule_with_warmup
    rank, world_size = world()
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * len(train_examples) / args.prompts_per_step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    updates = total_steps * args.num_iterations  # scheduler steps: one per gradient step on a batch
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * updates), updates)
    step, prompts_seen, elapsed = 0, 0, 0.0
    if is_checkpoint(args.resume):
        require(os.path.samefile(args.resume, checkpoints(args.output_dir)[-1]), f"{args.resume} is not the "
                f"newest checkpoint of {args.output_dir}, and going on from it would overwrite the newer ones; "
                "resume the newest, or use this one with --eval-only or --export")
        step, prompts_seen, elapsed = load_checkpoint(args.resume, model, args, optimizer, schedule)
    done = saved = step
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    log_path = os.path.join(args.output_dir, "metrics.jsonl")
    if rank == 0:
        forget_after(log_path, step)
    say(f"AGRPO on {args.task}: steps {step + 1}..{total_steps} of {args.prompts_per_step} prompts x "
        f"{args.group_size} completions on {world_size} process(es), {sum(p.numel() for p in trainable):,} "
        f"trainable parameters; run directory {args.output_dir}")
    started = time.time() - elapsed
    bar = tqdm(range(step + 1, total_steps + 1), desc="AGRPO", dynamic_ncols=True, disable=rank > 0)
    try:
        if args.eval_every and step == 0:  # the starting point of the curve
            log_metrics(log_path, 0, evaluate_all(model, tokenizer, test_examples, args, 0))
        for step in bar:
            torch.manual_seed(keyed_seed(args, step, rank))  # LoRA dropout, seeded per (step, process)
            batch = prompts_at(train_examples, args.seed, prompts_seen, args.prompts_per_step)
            metrics = rl_step(model, tokenizer, optimizer, schedule, batch, args, step)  # Stop: step abandoned
            done, prompts_seen = step, prompts_seen + args.prompts_per_step
            log_metrics(log_path, step, {**metrics, "prompts_seen": prompts_seen,
                                         "elapsed_seconds": time.time() - started})
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            gen=f"{metrics['seconds_generate']:.1f}s", train=f"{metrics['seconds_train']:.1f}s")
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):  # Stop: eval dropped
                log_metrics(log_path, step, evaluate_all(model, tokenizer, test_examples, args, step))
            if step == total_steps or (args.save_every and step % args.save_every == 0):
                saved = save_checkpoint(model, optimizer, schedule, step, prompts_seen, time.time() - started, args)
    except Stop:
        bar.close()
        if done > saved:
            save_checkpoint(model, optimizer, schedule, done, prompts_seen, time.time() - started, args)
        say(f"stopped by {signal.Signals(STOP_SIGNALS[0]).name} after step {done} of {total_steps}"
            f"{' (checkpoint saved)' if done > saved else ''}; resume with: {resume_command(args)}")
        raise SystemExit(128 + STOP_SIGNALS[0])
    bar.close()
    if rank == 0:
        plot_curves(args.output_dir)
        say(summary(args.output_dir, time.time() - started))


# ----------------------------------------------------------------------------------------------------------
# 6. Evaluation (the authors': C=256, BL=32, T=128, low_confidence, greedy)
@torch.no_grad()
def evaluate(model, tokenizer, examples, args, T, path):
    """Decode the test prompts with the evaluation settings in T denoising steps and grade them. Each process
    takes every world_size-th example; rank 0 writes one JSON line per example in the test set's order, with
    the reference and the answer the grader read, so that a score can be audited."""
    rank, world_size = world()
    eval_args = dataclasses.replace(args, completion_length=args.eval_completion_length, sampling_steps=T,
                                    block_length=args.eval_block_length, unmasking=args.eval_unmasking,
                                    temperature=args.eval_temperature)
    raw = unwrap(model).eval()
    mine, rows, seconds = examples[rank::world_size], [], 0.0
    # batches of prompts of similar length, so that few are padded (padding costs a mask: with_completion)
    prompts = tokenizer(prompt_texts(tokenizer, mine, args), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(mine)), key=lambda j: len(prompts[j]))
    shard = math.ceil(len(examples) / world_size)  # as many batches, hence stop checks, on every process
    for i in tqdm(range(0, shard, args.eval_batch_size), desc=f"eval T={T}", disable=rank > 0, leave=False):
        check_stop(args)
        index = order[i:i + args.eval_batch_size]
        if not index:
            continue
        chunk, clock = [mine[j] for j in index], time.perf_counter()
        rollout = generate(raw, *tokenize_prompts(tokenizer, chunk, args), eval_args,
                           keyed_generator(args, -1, T, rank, i))
        synchronize(args)
        seconds += time.perf_counter() - clock
        lengths = (rollout.tokens != args.eos_token_id).sum(1).tolist()
        rows += [{"index": rank + world_size * j, "question": ex["question"], "reference": reward.reference(
                  args.task, ex), "answer": g["answer"], "score": g["score"], "length": n, "completion": g["text"]}
                 for j, ex, g, n in zip(index, chunk, grade(tokenizer, rollout.tokens, chunk, args), lengths)]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (rows, seconds))
        rows, seconds = [r for part, _ in gathered for r in part], sum(s for _, s in gathered)
    rows.sort(key=lambda row: row["index"])
    if rank == 0:
        write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
    n = max(len(rows), 1)
    return {f"eval_T{T}_accuracy": sum(r["score"] for r in rows) / n,
            f"eval_T{T}_completion_length": sum(r["length"] for r in rows) / n,
            f"eval_T{T}_seconds_per_completion": seconds / n}


def evaluate_all(model, tokenizer, examples, args, step, name="eval"):
    """Evaluate at every T of --eval-sampling-steps; print each result as it comes."""
    metrics = {}
    for T in args.eval_steps:
        path = os.path.join(args.output_dir, f"{name}-step{step}-T{T}.jsonl")
        metrics.update(evaluate(model, tokenizer, examples, args, T, path))
        say(f"step {step}: evaluation accuracy {metrics[f'eval_T{T}_accuracy']:.1%} at T={T} on {len(examples)} "
            f"problems ({path})")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# 7. Runs and checkpoints: a directory a run, atomic saves, exact resume, Ctrl-C, curves, merged export
STRUCTURE = ("model", "task", "dtype", "lora_rank", "lora_alpha", "lora_targets")  # fixed for a run's life
ACTIONS = ("resume", "export", "eval_only")  # what one command does: never taken from a saved run


def say(message):
    """Print on the first process only (also before torch.distributed starts)."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(message)


def write_atomically(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def checkpoints(run):
    """The run's checkpoint directories, oldest first."""
    names = [d for d in os.listdir(run) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(run) else []
    return [os.path.join(run, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]


def is_checkpoint(path):
    return bool(path) and os.path.isfile(os.path.join(path, "state.pt"))


def is_run(path):
    return os.path.isfile(os.path.join(path, "config.json")) or bool(checkpoints(path))


def find_resume(resume, output_dir):
    """(run directory, checkpoint to continue from, or None to restart a run that has none) for --resume
    latest (the run under runs/ written to last, or --output-dir) | RUN | CHECKPOINT."""
    if is_checkpoint(resume):
        return os.path.dirname(os.path.normpath(resume)), resume
    if resume == "latest" and not output_dir:
        runs = [os.path.join("runs", d) for d in os.listdir("runs")] if os.path.isdir("runs") else []
        require(any(map(is_run, runs)), "there is no run under runs/ to resume; give its directory, or drop --resume")
        output_dir = max(filter(is_run, runs), key=lambda r: max(e.stat().st_mtime for e in os.scandir(r)))
    run = output_dir if resume == "latest" else resume
    require(is_run(run), f"--resume {resume}: {run} holds no run; give a run or checkpoint directory")
    require(checkpoints(run) or resume != "latest", f"the newest run, {run}, has no checkpoint yet: restart it "
            f"with --resume {run}, or start a new run without --resume")
    return run, (checkpoints(run) or [None])[-1]


def new_run_dir(task):
    """A fresh runs/<task>-<date>-<time>[-N]; mkdir is atomic, so two runs started in one second get two."""
    base = os.path.join("runs", f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs("runs", exist_ok=True)
    for n in itertools.count(1):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def open_run(args):
    """Claim this command's run directory and write the resolved settings there (config.json): a new run
    takes a fresh directory, or an --output-dir that holds no run; a resumed run keeps its own."""
    if not args.resume:
        args.output_dir = args.output_dir or new_run_dir(args.task)
        os.makedirs(args.output_dir, exist_ok=True)
        require(not is_run(args.output_dir) and not os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")),
                f"{args.output_dir} already holds a run: continue it with --resume {args.output_dir}, or choose "
                "another --output-dir")
    write_atomically(os.path.join(args.output_dir, "config.json"), json.dumps(dataclasses.asdict(args), indent=1))
    return args.output_dir


def save_checkpoint(model, optimizer, schedule, step, prompts_seen, elapsed, args):
    """output_dir/checkpoint-<step> (first process only): trainable weights (the adapters under LoRA),
    optimizer, schedule, step, data position, run time and the resolved settings. Written into a temporary
    directory, then renamed, so a crash or a full disk mid-write never leaves a checkpoint that loads wrong.
    The newest keep_checkpoints are kept. Returns the step."""
    if world()[0] > 0:
        return step
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
    try:
        os.makedirs(tmp, exist_ok=True)
        torch.save({"model": {n: p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad},
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                    "prompts_seen": prompts_seen, "elapsed": elapsed}, os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=1)
        os.replace(tmp, os.path.join(args.output_dir, f"checkpoint-{step}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(args.output_dir)[:-args.keep_checkpoints]:
        shutil.rmtree(old)
    return step


def load_checkpoint(path, model, args, optimizer=None, schedule=None):
    """Restore a checkpoint's weights (and the optimizer and schedule, if given); returns (step, prompts seen,
    seconds run)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location=args.device, weights_only=True)
        weights, step, prompts_seen = state["model"], state["step"], state["prompts_seen"]
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); resume from "
                         "an earlier one") from None
    raw = unwrap(model)
    require(set(weights) == {n for n, p in raw.named_parameters() if p.requires_grad}, f"checkpoint {path} "
            "holds other trainable weights than this model; resume with the settings it was saved with")
    raw.load_state_dict(weights, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    return step, prompts_seen, state.get("elapsed", 0.0)


def export(model, tokenizer, path):
    """Fold the adapters into the weights and write a transformers model that from_pretrained loads back
    (into a temporary directory, then renamed)."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merge_lora(unwrap(model)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    say(f"exported the merged model to {path}")


def log_metrics(log_path, step, metrics):
    if world()[0] == 0:
        with open(log_path, "a") as log:
            log.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(log_path):
    """The metric lines of a run (a last line cut short by a crash is skipped)."""
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        return [json.loads(line) for line in f.read().splitlines(keepends=True) if line.endswith("\n")]


def forget_after(log_path, step):
    """Keep the metric lines of steps up to `step`, the checkpoint resumed (none when a run restarts)."""
    if os.path.exists(log_path):
        rows = [row for row in read_metrics(log_path) if 0 < step and row["step"] <= step]
        write_atomically(log_path, "".join(json.dumps(row) + "\n" for row in rows))


def resume_command(args):
    launcher = f"torchrun --nproc_per_node {world()[1]} agrpo.py" if world()[1] > 1 else "python agrpo.py"
    return f"{launcher} --resume {args.output_dir}"


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop at its next check_stop: the step in progress is
    finished or abandoned, a checkpoint written and the resume command printed. A second signal stops at
    once; the checkpoints already written are intact (they are written atomically)."""
    def ask(signum, frame):
        if STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        STOP_SIGNALS.append(signum)
        say(f"{signal.Signals(signum).name}: stopping at the next safe point (again to stop at once)")

    STOP_SIGNALS.clear()
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def plot_curves(run):
    """run/curves.svg: reward, accuracy, evaluation accuracy and completion length against the step, a picture
    any browser opens (nothing to install)."""
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    evals = sorted({k for r in rows for k in r if k.startswith("eval_T") and k.endswith("_accuracy")})
    panels = [("reward", ["reward"]), ("training accuracy", ["accuracy"]), ("evaluation accuracy", evals),
              ("completion length", ["completion_length"])]
    W, H, colors = 380, 220, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{2 * H}" font-family="sans-serif" '
           'font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for n, (title, keys) in enumerate(panels):
        x0, y0, w, h = n % 2 * W + 50, n // 2 * H + 25, W - 70, H - 60
        series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
        (s0, s1), (v0, v1) = [(min(c), max(c)) for c in zip(*(sum(series.values(), []) or [(0, 0)]))]
        X = lambda s: round(x0 + (s - s0) / ((s1 - s0) or 1) * w, 1)
        Y = lambda v: round(y0 + h - (v - v0) / ((v1 - v0) or 1) * h, 1)
        svg.append(f'<text x="{x0}" y="{y0 - 8}" font-weight="bold">{title}</text><rect x="{x0}" y="{y0}" '
                   f'width="{w}" height="{h}" fill="none" stroke="#999"/><text x="{x0 - 4}" y="{y0 + 8}" '
                   f'text-anchor="end">{v1:.3g}</text><text x="{x0 - 4}" y="{y0 + h}" text-anchor="end">{v0:.3g}'
                   f'</text><text x="{x0}" y="{y0 + h + 14}">step {s0}</text><text x="{x0 + w}" y="{y0 + h + 14}" '
                   f'text-anchor="end">step {s1}</text>')
        for i, (color, (key, pts)) in enumerate(zip(colors, series.items())):
            svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                       + " ".join(f"{X(s)},{Y(v)}" for s, v in pts) + '"/>')
            if len(pts) < 30:  # few points (evaluations): mark each
                svg += [f'<circle cx="{X(s)}" cy="{Y(v)}" r="2.5" fill="{color}"/>' for s, v in pts]
            if len(keys) > 1:
                svg.append(f'<text x="{x0 + 6}" y="{y0 + 14 + 13 * i}" fill="{color}">{key}</text>')
    write_atomically(os.path.join(run, "curves.svg"), "\n".join(svg + ["</svg>\n"]))


def summary(run, seconds):
    """A paragraph on the run: its length, reward and accuracy at the start and the end, where the files are."""
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    steps = [r for r in rows if "reward" in r]
    n = max(1, len(steps) // 10)
    mean = lambda part, key: sum(r[key] for r in part) / len(part)
    text = (f"Done: {steps[-1]['step']} step(s), {steps[-1]['prompts_seen']:,} prompts, in "
            f"{f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.1f} min'}. Training reward "
            f"{mean(steps[:n], 'reward'):.2f} -> {mean(steps[-n:], 'reward'):.2f}, accuracy "
            f"{mean(steps[:n], 'accuracy'):.1%} -> {mean(steps[-n:], 'accuracy'):.1%} (means of the first and "
            f"last {n} steps).") if steps else f"No training step was logged in {run}."
    for key in sorted({k for r in rows for k in r if k.startswith("eval_T") and k.endswith("_accuracy")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        (s0, a0), (s1, a1) = points[0], points[-1]
        text += f" Evaluation accuracy at T={key[6:-9]}: {a0:.1%} at step {s0} -> {a1:.1%} at step {s1}."
    return text + f"\nCurves: {run}/curves.svg   metrics: {run}/metrics.jsonl   checkpoints: {run}/checkpoint-*"


# ----------------------------------------------------------------------------------------------------------
# 8. Command line: flags, config files, the toy preset, resumed settings, clear errors, main
def flag(name):
    return "--" + name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence through main, naming the nearest flag to a misspelt one
        typo = re.search(r"unrecognized arguments: (--[\w-]+)", message)
        near = difflib.get_close_matches(typo[1], self._option_string_actions, n=1) if typo else []
        raise ValueError(message + (f" (did you mean {near[0]}?)" if near else "") + "; see --help")


def build_parser():
    """One flag per field of Args, grouped as Args is. Every default is SUPPRESS, so that parsing returns only
    what was typed."""
    parser = Parser(prog="agrpo.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
                    usage="python agrpo.py [config.yaml] [--flag value ...]   (torchrun ... agrpo.py for DDP)",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="AGRPO: policy gradients for masked diffusion language models. Defaults are the "
                                "authors' settings for LLaDA-8B-Instruct on a GPU.",
                    epilog="examples:\n  python agrpo.py --task countdown\n"
                           "  python agrpo.py --task countdown --model toy --device cpu\n"
                           "  python agrpo.py my.yaml --learning-rate 1e-5\n  python agrpo.py --resume latest")
    parser.add_argument("config", nargs="?", help="a JSON or YAML file of settings, keys named as the flags "
                        "(with - or _); flags typed as well override it")
    group = parser
    for f in dataclasses.fields(Args):
        group = parser.add_argument_group(f.metadata["group"]) if f.metadata["group"] else group
        default = "" if f.default is None else f" (default: {f.default}" + (
            f"; toy: {TOY[f.name]})" if f.name in TOY else ")")
        options = dict(help=(f.metadata["help"] + default).replace("%", "%%"))
        if f.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(f.type) is Literal:
            options["choices"] = typing.get_args(f.type)
        else:  # int, float, str, or Optional of one of them
            options["type"] = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
            options["metavar"] = {int: "N", float: "X"}.get(options["type"], f.name.split("_")[-1].upper())
        group.add_argument(flag(f.name), **options)
    return parser


def config_flags(path):
    """A JSON or YAML file of settings as flags, so that they are checked as typed ones are."""
    import yaml
    with open(path) as f:
        settings = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    require(isinstance(settings, dict), f"{path} should hold a mapping of settings, like learning_rate: 1.0e-5")
    flags = []
    for key, value in settings.items():
        if isinstance(value, bool):
            flags.append(flag(str(key)) if value else "--no-" + flag(str(key))[2:])
        elif value is not None:
            flags += [flag(str(key)), str(value)]
    return flags


def parse_args(argv=None):
    """The settings, from the lowest priority to the highest: Args' defaults, the --model toy preset, a
    resumed run's saved settings, a config file, the flags typed. Validated."""
    parser = build_parser()
    typed = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))  # only what was typed
    if "config" in typed:
        path = typed.pop("config")
        try:
            typed = {**vars(parser.parse_args(config_flags(path))), **typed}
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    saved, run = {}, {}
    if typed.get("resume"):
        directory, checkpoint = find_resume(typed["resume"], typed.get("output_dir"))
        saved = saved_settings(checkpoint or directory, typed)
        run = dict(output_dir=directory, resume=checkpoint or directory)  # no checkpoint: restart the run
    args = Args(**{**(TOY if {**saved, **typed}.get("model") == "toy" else {}), **saved, **typed, **run})
    validate(args)
    return args


def saved_settings(path, typed):
    """The settings a run was saved with (a checkpoint's args.json, or the run's config.json), but this
    command's actions. Prints what a typed flag changes; refuses a change of the model's structure."""
    try:
        with open(os.path.join(path, "args.json" if is_checkpoint(path) else "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"the settings of {path} cannot be read ({e}); resume from another checkpoint") from None
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)} - set(ACTIONS)}
    for name in sorted(set(typed) & set(saved) - {"output_dir"}):
        if typed[name] != saved[name]:
            require(name not in STRUCTURE, f"{flag(name)} {typed[name]}: {path} was trained with {saved[name]}, "
                    "and a model's structure cannot change on resume; drop the flag")
            say(f"resume: {flag(name)} {saved[name]} -> {typed[name]}")
    return saved


def require(ok, message):
    if not ok:
        raise ValueError(message)


def validate(args):
    """Check every setting before anything runs; the first that cannot work raises ValueError naming the fix."""
    bounds = [  # fields, test, what they must be
        (("prompts_per_step", "micro_batch_size", "mc_samples", "num_iterations", "eval_batch_size",
          "keep_checkpoints", "max_steps"), lambda v: v >= 1, "at least 1"),
        (("mask_token_id", "eos_token_id", "train_examples", "eval_examples", "lora_rank", "top_k", "eval_every",
          "save_every", "learning_rate", "weight_decay", "beta", "eval_temperature", "toy_warmup_steps"),
         lambda v: v >= 0, "0 or more"),
        (("lora_alpha", "max_grad_norm", "num_train_epochs", "epsilon"), lambda v: v > 0, "more than 0"),
        (("temperature",), lambda v: v > 0, "more than 0 (greedy decoding, 0, is for --eval-temperature)"),
        (("adam_beta1", "adam_beta2", "warmup_ratio", "lora_dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
        (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
        (("group_size",), lambda v: v >= 2, "at least 2 (advantages compare the completions of a prompt)")]
    for names, ok, what in bounds:
        for name in names:
            value = getattr(args, name)
            require(value is None or ok(value), f"{flag(name)} {value}: must be {what}")
    require(args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device),
            f"--device {args.device}: use cuda, cuda:N (a GPU) or cpu")
    require(args.beta == 0 or args.lora_rank > 0,
            "--beta > 0 needs LoRA (--lora-rank > 0): the reference is the model with its adapters off")
    require(all(args.lora_targets.split(",")), "--lora-targets: give layer names, comma-separated")
    check_geometry(args.completion_length, args.block_length, args.sampling_steps)
    require(re.fullmatch(r"\d+(,\d+)*", args.eval_sampling_steps),
            f"--eval-sampling-steps {args.eval_sampling_steps}: give step counts like 128,64,32")
    for T in args.eval_steps:
        check_geometry(args.eval_completion_length, args.eval_block_length, T,
                       ("--eval-completion-length", "--eval-block-length", "--eval-sampling-steps"))
    check_batch(args, 1)
    for name in ("output_dir", "export"):
        path = getattr(args, name)
        require(path is None or not os.path.isfile(path), f"{flag(name)} {path} is a file; give a directory")
    require(args.export is None or not os.path.isdir(args.export) or not os.listdir(args.export),
            f"--export {args.export} is not empty; give a new directory (nothing is overwritten)")


def check_batch(args, world_size):
    """Whole prompt groups on every process, and micro-batches that split each process's completions."""
    if args.prompts_per_step % world_size or args.prompts_per_step // world_size * args.group_size % \
            args.micro_batch_size:
        raise ValueError(f"{world_size} process(es) need --prompts-per-step divisible by {world_size} and "
                         "--micro-batch-size dividing each process's prompts x --group-size; e.g. --prompts-per-"
                         f"step {math.ceil(args.prompts_per_step / world_size) * world_size} --micro-batch-size "
                         f"{args.group_size}")


def setup(args):
    """Everything that can fail for reasons outside the code, each failure one clear sentence (ValueError)."""
    require(not args.device.startswith("cuda") or torch.cuda.is_available(), "CUDA is not available here. "
            "LLaDA-8B needs a GPU (see README); for an offline CPU run use --model toy --device cpu")
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun: one process per GPU
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    check_batch(args, world()[1])
    try:
        train_examples = [] if args.eval_only or args.export else reward.load_examples(
            args.task, "train", args.data, n=args.train_examples or None, seed=args.seed)
        test_examples = reward.load_examples(args.task, "test", args.data, n=args.eval_examples or None,
                                             gsm8k_test=args.gsm8k_test) if args.eval_every or args.eval_only else []
    except reward.DataUnavailable as e:
        raise ValueError(str(e)) from None
    require(train_examples or args.eval_only or args.export, f"no training examples for {args.task}")
    model, tokenizer = load_model_and_tokenizer(args)
    if args.activation_checkpointing:  # recompute activations in the backward pass: less memory, ~1/3 more time
        if hasattr(getattr(model, "model", None), "set_activation_checkpointing"):  # LLaDA's remote code
            model.model.set_activation_checkpointing("whole_layer")
        else:
            require(model.supports_gradient_checkpointing, "this model has no activation checkpointing")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, train_examples, test_examples


def from_rank0(value):
    """The first process's value, on every process."""
    if world()[1] > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def main(argv=None):
    """Train (or evaluate, or export) as the flags say. Expected failures end with one sentence, not a
    traceback; Ctrl-C and SIGTERM save and print how to resume."""
    try:
        args = parse_args(argv)
        model, tokenizer, train_examples, test_examples = setup(args)
        step = 0
        if (args.export or args.eval_only) and is_checkpoint(args.resume):  # training loads its own
            step = load_checkpoint(args.resume, model, args)[0]
        if args.export:
            return export(model, tokenizer, args.export) if world()[0] == 0 else None
        if not (args.eval_only and args.resume):  # evaluating a run only adds files to it
            args.output_dir = from_rank0(open_run(args) if world()[0] == 0 else None)
        with stop_on_signals():
            if args.eval_only:
                return evaluate_all(model, tokenizer, test_examples, args, step,
                                    name=f"eval-only-{time.strftime('%Y%m%d-%H%M%S')}")
            train(model, tokenizer, train_examples, test_examples, args)
    except ValueError as e:
        raise SystemExit(f"agrpo: {e}") from None
    except OSError as e:  # a full disk, a read-only or missing directory: what could not be done to which file
        raise SystemExit(f"agrpo: cannot write {e.filename}: {(e.strerror or str(e)).lower()}; nothing saved "
                         "before is lost" if e.filename else f"agrpo: {e}") from None
    except Stop:
        raise SystemExit(f"agrpo: stopped by {signal.Signals(STOP_SIGNALS[0]).name}; nothing was written")
    finally:
        if dist.is_initialized():
            dist.barrier()  # let rank 0 finish writing before any process leaves
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
