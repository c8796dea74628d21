"""AGRPO: policy gradients for masked diffusion language models, in one file.

Reference implementation of "Simple Policy Gradients for Reasoning with Diffusion Language Models"
(A. Zhan, arXiv 2510.04019). The file follows the paper in order:

  0. Config            every hyperparameter, the authors' settings as defaults
  1. Loading           LLaDA-8B-Instruct (or an offline toy model), plain LoRA
  2. Sampler           section 1: generation as a Markov decision process
  3. Advantages        section 3: rewards (reward.py) and group-relative advantages
  4. Policy gradient   section 2: the amortized Monte Carlo estimator
  5. Training loop     section 4: the authors' recipe, on one GPU or many (torchrun)
  6. Evaluation        greedy decoding of the test split at one or several step counts
  7. Checkpoints       atomic saves, exact resume, merged export
  8. main              flags, clear errors, the loop

Run `python agrpo.py --help` for every flag; `python agrpo.py --task countdown --model toy --device cpu`
runs the whole method offline on a CPU in seconds.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

import reward as tasks


# ----------------------------------------------------------------------------------------------------------
# 0. Config
def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # task and model
    task: Literal["countdown", "gsm8k", "math500", "sudoku"] = arg("countdown", "Task to train on (reward.py).")
    model: str = arg("GSAI-ML/LLaDA-8B-Instruct", "Hub id or local path of a masked diffusion LM; 'toy' builds "
                     "a tiny random one offline and shrinks the defaults below to a CPU-sized run.")
    data: Literal["hub", "synthetic"] = arg("hub", "Where examples come from: the paper's hub data sets, or "
                                            "seeded offline generators (countdown, sudoku).")
    device: str = arg("cuda", "Torch device ('cuda', 'cuda:1', 'cpu').")
    dtype: Literal["bfloat16", "float32"] = arg("bfloat16", "Model weights' dtype.")
    mask_token_id: int = arg(126336, "Id of the mask token (LLaDA: 126336).")
    eos_token_id: Optional[int] = arg(None, "Id of EOS; default: the model config's.")
    train_examples: int = arg(0, "Train on the first N training examples only (0: all).")
    seed: int = arg(333, "Seed of every random generator.")
    output_dir: Optional[str] = arg(None, "Where metrics, evaluations and checkpoints go; default: a new "
                                    "runs/<task>-<date>-<time>, or the run of the checkpoint resumed.")
    # LoRA (section 4)
    lora_rank: int = arg(64, "LoRA rank r; 0 trains all weights.")
    lora_alpha: float = arg(64.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input.")
    lora_targets: str = arg("q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out",
                            "Comma-separated names of the linear layers that get adapters (LLaDA's names).")
    # optimisation (section 4)
    learning_rate: float = arg(5e-6, "AdamW peak learning rate.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.99, "AdamW beta2.")
    weight_decay: float = arg(0.01, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Gradient-norm clip.")
    warmup_ratio: float = arg(0.01, "Share of steps with linear warm-up before the cosine decay.")
    num_train_epochs: float = arg(5.0, "Passes over the training prompts (sets the number of steps).")
    max_steps: int = arg(-1, "Optimizer steps; > 0 overrides num_train_epochs.")
    # batch (section 4: 16 prompts x 8 completions per optimizer step)
    prompts_per_step: int = arg(16, "Prompts per optimizer step, over all devices.")
    group_size: int = arg(8, "Completions per prompt, G (section 3).")
    micro_batch_size: int = arg(8, "Completions per forward pass on one device (gradient accumulation follows).")
    # training rollouts (section 1)
    completion_length: int = arg(384, "Completion length C.")
    block_length: int = arg(12, "Semi-autoregressive block length BL.")
    sampling_steps: int = arg(128, "Denoising steps T; each reveals C/T tokens.")
    unmasking: Literal["random", "low_confidence"] = arg("random", "Which masked positions a step reveals.")
    temperature: float = arg(0.6, "Sampling temperature (0 = greedy).")
    top_p: float = arg(0.99, "Nucleus truncation of the support (1 = off).")
    top_k: int = arg(150, "Top-k truncation of the support (0 = off).")
    # the estimator (section 2) and the objective
    mc_samples: int = arg(24, "Sampled timesteps M per completion.")
    importance_sampling: Literal["entropy", "uniform"] = arg("entropy", "Distribution q over timesteps.")
    low_discrepancy: bool = arg(True, "Stratify the batch's uniforms before the inverse CDF of q.")
    epsilon: float = arg(0.2, "PPO clip range eps.")
    beta: float = arg(0.0, "Weight of the k3 KL to the reference (adapters off; needs lora_rank > 0).")
    num_iterations: int = arg(1, "Gradient steps per batch of rollouts.")
    update_schedule: Literal["paper", "released"] = arg(
        "paper", "'paper': one optimizer update per batch. 'released': the authors' released trainer, which "
        "accumulates every micro-batch but a process's last, then updates after each sampled step of it "
        "(M updates per step; see README).")
    scale_rewards: Literal["none", "std"] = arg("none", "'std' divides advantages by the group std (GRPO); "
                                                "the authors only centre them.")
    activation_checkpointing: bool = arg(False, "Recompute activations in the backward pass (saves memory).")
    # evaluation (section 4: greedy, low-confidence decoding of C=256 in blocks of 32)
    eval_every: int = arg(0, "Evaluate on the test split every N steps, at the start and at the end (0: never).")
    eval_only: bool = arg(False, "Only evaluate (the bare model, or the one restored by --resume).")
    eval_sampling_steps: str = arg("128", "Comma-separated step counts T to evaluate at, e.g. 128,64,32.")
    eval_completion_length: int = arg(256, "Completion length C for evaluation.")
    eval_block_length: int = arg(32, "Block length BL for evaluation.")
    eval_unmasking: Literal["random", "low_confidence"] = arg("low_confidence", "Unmasking for evaluation.")
    eval_temperature: float = arg(0.0, "Temperature for evaluation (0 = greedy).")
    eval_batch_size: int = arg(16, "Test prompts per forward pass.")
    eval_examples: int = arg(0, "Evaluate on the first N test examples only (0: all).")
    # checkpoints
    save_every: int = arg(15, "Save a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = arg(3, "Keep the newest N checkpoints.")
    resume: Optional[str] = arg(None, "Continue from a checkpoint directory, or 'latest' in --output-dir.")
    export: Optional[str] = arg(None, "Write the model (adapters merged, transformers format) to this path "
                                "and exit; with --resume, the trained one.")

    @property
    def eval_steps(self):
        return [int(t) for t in str(self.eval_sampling_steps).split(",")]


# `--model toy`: a CPU-sized run. Applied to the fields still at their defaults.
TOY = dict(data="synthetic", device="cpu", dtype="float32", mask_token_id=2, lora_rank=0, learning_rate=3e-4,
           prompts_per_step=4, group_size=4, micro_batch_size=16, completion_length=32, block_length=8,
           sampling_steps=16, mc_samples=4, top_k=0, top_p=1.0, temperature=1.0, eval_completion_length=32,
           eval_block_length=8, eval_sampling_steps="16", eval_examples=32)


def check_sampler(args):
    """Reject a sampler geometry or truncation that cannot run, naming the fix (raises ValueError)."""
    C, BL, T = args.completion_length, args.block_length, args.sampling_steps
    if min(C, BL, T) <= 0 or C % BL or T % (C // BL) or BL % (T // (C // BL)):
        raise ValueError(f"--completion-length {C}, --block-length {BL}, --sampling-steps {T} do not fit: C must "
                         "be a multiple of BL, T a multiple of the number of blocks C/BL, and each block's BL "
                         "tokens must split evenly over its T/(C/BL) steps (e.g. C=384, BL=12, T=128)")
    if not (args.temperature >= 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
        raise ValueError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")


def check(args):
    """Reject settings training cannot run with, naming the fix (raises ValueError)."""
    check_sampler(args)
    if args.group_size < 2 or args.mc_samples < 1 or args.num_iterations < 1 or args.temperature <= 0:
        raise ValueError("training needs --group-size >= 2, --mc-samples >= 1, --num-iterations >= 1 and "
                         "--temperature > 0 (greedy decoding is for evaluation)")
    if args.beta > 0 and args.lora_rank == 0:
        raise ValueError("--beta > 0 needs LoRA (--lora-rank > 0): the reference is the model, adapters off")
    if not all(t.strip().isdigit() for t in str(args.eval_sampling_steps).split(",")):
        raise ValueError(f"--eval-sampling-steps {args.eval_sampling_steps!r}: give step counts like 128,64,32")
    try:
        for steps in args.eval_steps:
            check_sampler(dataclasses.replace(args, completion_length=args.eval_completion_length,
                                              block_length=args.eval_block_length, sampling_steps=steps))
    except ValueError as e:
        raise ValueError(f"evaluation settings: {e}".replace("--", "--eval-")) from None
    if args.micro_batch_size <= 0 or args.prompts_per_step * args.group_size % args.micro_batch_size:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} must divide prompts x group size "
                         f"({args.prompts_per_step} x {args.group_size})")


def geometry(args):
    """Blocks, steps per block and tokens revealed per step k (section 1)."""
    blocks = args.completion_length // args.block_length
    steps_per_block = args.sampling_steps // blocks
    return blocks, steps_per_block, args.block_length // steps_per_block


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
    """The reference policy for the KL term (section 2): the base model, adapters switched off."""
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
    """A tiny random bidirectional masked LM (BERT-shaped) and a character tokenizer, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<mask>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", mask_token="<mask>", unk_token="<unk>",
        additional_special_tokens=specials[4:], padding_side="left",
        chat_template="{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=1024, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")
    return BertForMaskedLM(config), tokenizer


def load_model_and_tokenizer(args):
    """LLaDA-8B-Instruct through AutoModel (remote code, bf16), or the toy model; fills args.eos_token_id."""
    dtype = getattr(torch, args.dtype)
    if args.model == "toy":
        model, tokenizer = toy_model_and_tokenizer(args.seed)
    else:
        from transformers import AutoModel, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True, padding_side="left")
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
    if args.eos_token_id is None:
        args.eos_token_id = model.config.eos_token_id if model.config.eos_token_id is not None \
            else tokenizer.eos_token_id
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device=args.device, dtype=dtype)
    return (add_lora(model, args) if args.lora_rank > 0 else model), tokenizer


# ----------------------------------------------------------------------------------------------------------
# 2. Masked diffusion sampler (section 1)
@dataclass
class Rollout:
    """B completions of length C and, per completion token, what the policy gradient needs."""
    prompt_ids: torch.Tensor            # (B, P) left-padded prompts
    prompt_mask: Optional[torch.Tensor]  # (B, P) 1 on real prompt tokens (None: no padding in the batch)
    tokens: torch.Tensor                # (B, C) completion ids
    step: torch.Tensor                  # (B, C) step that revealed the token; T for the EOS filler (no action)
    logp: torch.Tensor                  # (B, C) log pi_old(token | s_step), truncated and tempered
    entropy: torch.Tensor               # (B, C) entropy of that distribution
    support: Optional[torch.Tensor]     # (B, C, K) candidate ids, most probable first (None: no truncation)
    support_size: torch.Tensor          # (B, C) the support S_i is support[..., :support_size]

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
    """softmax(logits / temperature) restricted to S_i: top-k, then top-p (section 1, step 2).
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


def sample_tokens(logits, args, generator):
    """Sample every position from its truncated tempered distribution with float64 Gumbel-max.
    Returns tokens, their log-probs, the entropies, the supports (ids, size) and a confidence score."""
    if args.temperature == 0:  # greedy (evaluation): a point mass, ranked by the model's own log-prob
        confidence, tokens = logits.float().log_softmax(-1).max(-1)
        zeros = torch.zeros_like(confidence)
        return tokens, zeros, zeros, tokens[..., None], torch.ones_like(tokens), confidence
    z, ids, size = truncated_logits(logits, args)
    logq = z.log_softmax(-1)
    u = torch.rand(z.shape, dtype=torch.float64, device=z.device, generator=generator)
    pick = (z.double() - (-u.log()).log()).argmax(-1, keepdim=True)
    logp = logq.gather(-1, pick).squeeze(-1)
    entropy = torch.special.entr(logq.exp()).sum(-1)
    return ids.gather(-1, pick).squeeze(-1), logp, entropy, ids, size, logp


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, args, generator=None) -> Rollout:
    """Semi-autoregressive masked diffusion (section 1): C/BL blocks left to right, T steps in all, each step
    one forward pass and k = C/T revealed tokens of the current block, with everything recorded for section 2."""
    check_sampler(args)
    B, P = prompt_ids.shape
    C, BL, T = args.completion_length, args.block_length, args.sampling_steps
    blocks, steps_per_block, k = geometry(args)
    dev = prompt_ids.device
    x = torch.cat([prompt_ids, torch.full((B, C), args.mask_token_id, device=dev)], 1)
    prompt_mask = None if prompt_mask.all() else prompt_mask  # unpadded: no mask, so fused attention kernels
    step = torch.full((B, C), T, device=dev)
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
            logits = logits_at(model, x[rows], with_completion(prompt_mask, C, rows), block)  # step 1
            tokens, lp, ent, ids, size, confidence = sample_tokens(logits, args, generator)  # step 2
            masked = step[rows, lo:hi] == T  # not yet revealed (a sampled mask id counts as revealed)
            score = confidence if args.unmasking == "low_confidence" else \
                torch.rand(confidence.shape, device=dev, generator=generator)
            j = score.masked_fill(~masked, -math.inf).topk(k, dim=-1).indices               # (R, k)
            r = rows[:, None]                                                               # step 4
            x[r, P + lo + j] = tokens.gather(1, j)
            step[r, lo + j] = t
            logp[r, lo + j], entropy[r, lo + j] = lp.gather(1, j), ent.gather(1, j)
            support_size[r, lo + j] = size.gather(1, j)
            if support is not None:
                K = ids.shape[-1]
                support = nn.functional.pad(support, (0, max(K - support.shape[-1], 0)))
                support[r, lo + j, :K] = ids.gather(1, j[..., None].expand(-1, -1, K))
            t += 1
        # step 5: a block that came out all EOS ends its row; the rest becomes EOS filler, never an action
        done = (x[rows, P + lo:P + hi] == args.eos_token_id).all(-1)
        x[rows[done], P + hi:] = args.eos_token_id
        rows = rows[~done]
        if len(rows) == 0:
            break
    return Rollout(prompt_ids, prompt_mask, x[:, P:], step, logp, entropy, support, support_size)


# ----------------------------------------------------------------------------------------------------------
# 3. Rewards and group advantages (section 3)
def score(tokenizer, completions, examples, args):
    """Decode completions (N, C) and grade them with reward.py (section 5): the (N, 2) format and correctness
    parts of the shaped reward, the evaluation score (N,), and the texts."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    parts = [tasks.reward_parts(args.task, text, ex) for text, ex in zip(texts, examples)]
    correct = [tasks.is_correct(args.task, text, ex) for text, ex in zip(texts, examples)]
    return torch.tensor([[p["format"], p["correct"]] for p in parts]), torch.tensor(correct), texts


def group_advantages(rewards, group_size, scale="none"):
    """A_i = R_i - mean of its group of G; 'std' also divides by the group's standard deviation."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    if scale == "std":
        a = a / (r.std(1, keepdim=True) + 1e-4)
    return a.flatten()


# ----------------------------------------------------------------------------------------------------------
# 4. The amortized policy gradient (section 2)
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
        mass.scatter_add_(1, rollout.step.clamp(max=T - 1), rollout.entropy.double())
        mass = (mass + 1e-8) * live
    else:
        mass = live.double()
    q = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    t = torch.searchsorted(q.cumsum(1), u.view(B, M)).clamp(max=(L - 1).clamp_min(0)[:, None])
    weight = torch.where(L[:, None] > 0, 1 / (L[:, None] * q.gather(1, t)).clamp_min(1e-30), 0.0)
    return t, weight.float()


def step_logprobs(model, rollout, t, args):
    """log pi(x_i | s_t) of the k tokens each completion revealed at its step t (B,), under the recorded
    support and temperature. s_t is rebuilt by re-masking every token revealed at step >= t (the EOS
    filler included, it is marked with step T). Returns log-probs and positions, both (B, k)."""
    k = geometry(args)[2]
    now = rollout.step == t[:, None]
    pos = now.float().topk(k, dim=-1).indices                                   # the k positions revealed at t
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


def agrpo_loss(model, rollout, advantages, args, generator=None, scale=1.0, sync=True, after_backward=None):
    """AGRPO's policy gradient for one micro-batch: sample M timesteps per completion, and for each rebuild
    s_t, recompute the log-probs of the tokens revealed at t, form the PPO-clipped term (plus beta times the
    k3 KL to the reference) and back-propagate at once, so memory stays flat in M.
    The loss of one sampled step is sum over its tokens of term * weight / (M * G), times `scale`.
    Under DDP the gradients are all-reduced in the last backward pass only, and only if `sync`; with
    `after_backward` (called after every backward: the released trainer's optimizer updates) in each one.
    Returns metrics."""
    M, G, k = args.mc_samples, args.group_size, geometry(args)[2]
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
                term = term + args.beta * kl * ratio
                sums["kl"] += kl.detach().mean() / M
            loss = (term * weight[:, m, None]).sum() * scale / (M * G)
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
# 5. Training loop (section 4)
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
    return [tokenizer.apply_chat_template(tasks.prompt_messages(args.task, ex), add_generation_prompt=True,
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


def rl_step(model, tokenizer, optimizer, schedule, batch, args, step):
    """One AGRPO step on this process's whole prompt groups: generate G completions per prompt, score them,
    then num_iterations gradient steps, with gradients all-reduced once per step under DDP."""
    rank, size = world()
    batch = batch[rank * len(batch) // size:(rank + 1) * len(batch) // size]
    G, mb, raw = args.group_size, args.micro_batch_size, unwrap(model)
    examples = [ex for ex in batch for _ in range(G)]
    first = rank * len(examples) // mb  # global index of this process's first micro-batch
    clock = time.perf_counter()
    raw.eval()
    rollouts = [generate(raw, *tokenize_prompts(tokenizer, examples[i:i + mb], args), args,
                         keyed_generator(args, step, 0, first + i // mb)) for i in range(0, len(examples), mb)]
    synchronize(args)
    seconds = {"generate": time.perf_counter() - clock}

    clock = time.perf_counter()
    parts, correct, _ = score(tokenizer, torch.cat([r.tokens for r in rollouts]), examples, args)
    rewards = parts.sum(1)
    advantages = group_advantages(rewards, G, args.scale_rewards).to(args.device)
    seconds["score"] = time.perf_counter() - clock

    clock = time.perf_counter()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norms = []

    def update():
        grad_norms.append(nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for it in range(args.num_iterations):
        losses = []
        for i, r in enumerate(rollouts):
            last = i == len(rollouts) - 1
            released = last and args.update_schedule == "released"  # an update after every sampled step
            losses.append(agrpo_loss(model, r, advantages[i * mb:(i + 1) * mb], args,
                                     keyed_generator(args, step, 1 + it, first + i), scale=1 / len(batch),
                                     sync=last, after_backward=update if released else None))
        if args.update_schedule == "paper":
            update()  # one update per batch, as the paper describes
        schedule.step()  # once per iteration in both schedules: the released one's updates share one rate
    synchronize(args)
    seconds["train"] = time.perf_counter() - clock

    spread = rewards.view(-1, G).std(1)
    lengths = torch.cat([(r.tokens != args.eos_token_id).sum(1) for r in rollouts]).double()
    metrics = {"reward": rewards.mean(), "reward_format": parts[:, 0].mean(), "reward_correct": parts[:, 1].mean(),
               "accuracy": correct.mean(), "reward_std": spread.mean(),
               "zero_spread_groups": (spread == 0).double().mean(), "advantage_abs": advantages.abs().mean(),
               "advantage_min": advantages.min(), "advantage_max": advantages.max(),
               "loss": sum(m["loss"] for m in losses), "completion_length": lengths.mean(),
               "grad_norm": torch.stack(grad_norms).mean(), "lr": schedule.get_last_lr()[0]}
    metrics.update({k: sum(m[k] for m in losses) / len(losses) for k in ("clip_low", "clip_high", "kl")})
    metrics.update({f"seconds_{k}": v for k, v in seconds.items()})
    metrics["tokens_per_second"] = len(examples) * args.completion_length / sum(seconds.values())
    if args.device.startswith("cuda"):
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return mean_over_ranks(metrics, args)


def mean_over_ranks(metrics, args):
    """Plain floats, averaged over processes (peak memory: the maximum)."""
    values = torch.tensor([float(v) for v in metrics.values()], dtype=torch.float64, device=args.device)
    if world()[1] > 1:
        peak = values.clone()
        dist.all_reduce(values)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        values = torch.where(torch.tensor([k == "peak_memory_gb" for k in metrics], device=values.device),
                             peak, values / world()[1])
    return dict(zip(metrics, values.tolist()))


# ----------------------------------------------------------------------------------------------------------
# 6. Evaluation (section 4: C=256, BL=32, T=128, low_confidence, greedy)
@torch.no_grad()
def evaluate(model, tokenizer, examples, args, steps, path):
    """Decode the test prompts with the evaluation settings at `steps` sampling steps and grade them with
    reward.is_correct. Each process takes every size-th example; rank 0 writes one JSON line per example."""
    rank, size = world()
    eval_args = dataclasses.replace(args, completion_length=args.eval_completion_length, sampling_steps=steps,
                                    block_length=args.eval_block_length, unmasking=args.eval_unmasking,
                                    temperature=args.eval_temperature)
    raw = unwrap(model).eval()
    mine, rows, seconds = examples[rank::size], [], 0.0
    # batches of prompts of similar length, so that few are padded (padding costs a mask: with_completion)
    prompts = tokenizer(prompt_texts(tokenizer, mine, args), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(mine)), key=lambda j: len(prompts[j]))
    for i in tqdm(range(0, len(mine), args.eval_batch_size), desc=f"eval T={steps}", disable=rank > 0,
                  leave=False):
        index = order[i:i + args.eval_batch_size]
        chunk = [mine[j] for j in index]
        clock = time.perf_counter()
        rollout = generate(raw, *tokenize_prompts(tokenizer, chunk, args), eval_args,
                           keyed_generator(args, -1, steps, rank, i))
        synchronize(args)
        seconds += time.perf_counter() - clock
        _, correct, texts = score(tokenizer, rollout.tokens, chunk, args)
        lengths = (rollout.tokens != args.eos_token_id).sum(1).tolist()
        rows += [{"index": rank + size * j, "question": ex["question"], "completion": text, "length": n,
                  "score": c} for j, ex, text, n, c in zip(index, chunk, texts, lengths, correct.tolist())]
    if size > 1:
        gathered = [None] * size
        dist.all_gather_object(gathered, (rows, seconds))
        rows, seconds = [r for part, _ in gathered for r in part], sum(s for _, s in gathered)
    rows.sort(key=lambda row: row["index"])  # the test set's order
    if rank == 0:
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    n = max(len(rows), 1)
    return {f"eval_T{steps}_accuracy": sum(r["score"] for r in rows) / n,
            f"eval_T{steps}_completion_length": sum(r["length"] for r in rows) / n,
            f"eval_T{steps}_seconds_per_completion": seconds / n}


def evaluate_all(model, tokenizer, examples, args, step):
    out = {}
    for steps in args.eval_steps:
        out.update(evaluate(model, tokenizer, examples, args, steps,
                            os.path.join(args.output_dir, f"eval-step{step}-T{steps}.jsonl")))
    return out


# ----------------------------------------------------------------------------------------------------------
# 7. Checkpoints: atomic, resumable, exportable
STRUCTURE = ("model", "task", "dtype", "lora_rank", "lora_alpha", "lora_targets")  # must match to resume


def checkpoints(output_dir):
    found = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()] \
        if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, d) for d in sorted(found, key=lambda d: int(d[11:]))]


def save_checkpoint(model, optimizer, schedule, step, prompts_seen, args):
    """output_dir/checkpoint-<step>: trainable weights (the adapters under LoRA), optimizer, schedule, step,
    data position and the resolved config. Written into a temporary directory that is then renamed, so a
    crash mid-write never leaves a checkpoint that loads wrong; the newest keep_checkpoints are kept."""
    raw = unwrap(model)
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"model": {n: p.detach() for n, p in raw.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                "prompts_seen": prompts_seen}, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=1)
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again after a resume
    os.replace(tmp, final)
    for old in checkpoints(args.output_dir)[:-args.keep_checkpoints]:
        shutil.rmtree(old)


def load_checkpoint(path, model, optimizer, schedule, args):
    """Restore a checkpoint (a path, or 'latest' in output_dir); returns (step, prompts seen)."""
    if path == "latest":
        found = checkpoints(args.output_dir)
        if not found:
            raise SystemExit(f"agrpo: no checkpoint in {args.output_dir} to resume; drop --resume to start anew")
        path = found[-1]
    try:
        with open(os.path.join(path, "args.json")) as f:
            saved = json.load(f)
        state = torch.load(os.path.join(path, "state.pt"), map_location=args.device, weights_only=True)
        weights, step, prompts_seen = state["model"], state["step"], state["prompts_seen"]
    except Exception as e:
        raise SystemExit(f"agrpo: checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                         "resume from an earlier one")
    changed = [f"--{k} {saved.get(k)!r} (now {getattr(args, k)!r})"
               for k in STRUCTURE if saved.get(k) != getattr(args, k)]
    raw = unwrap(model)
    trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
    if changed or set(weights) != trainable:
        raise SystemExit(f"agrpo: checkpoint {path} does not match this model: it was trained with "
                         f"{', '.join(changed) or 'other trainable weights'}; pass the same settings")
    raw.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return step, prompts_seen


def export(model, tokenizer, path):
    """Fold the adapters into the weights and write a transformers model that from_pretrained loads back."""
    merge_lora(unwrap(model)).save_pretrained(path)
    tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------------------
# 8. main
def parse_args(argv=None):
    from transformers import HfArgumentParser
    parser = HfArgumentParser(Args)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0]) if argv[0].endswith(("yaml", "yml")) \
            else parser.parse_json_file(argv[0])
    else:
        args, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
        if unknown:
            raise ValueError(f"unknown arguments {' '.join(unknown)}; see --help")
    if args.model == "toy":
        defaults = Args()
        for name, value in TOY.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args)
    return args


def default_output_dir(args):
    """The run a checkpoint belongs to; for 'latest', the run under runs/ saved most recently; else a new one."""
    if args.resume == "latest":
        runs = [d for d in (os.path.join("runs", r) for r in sorted(os.listdir("runs")))
                if checkpoints(d)] if os.path.isdir("runs") else []
        if not runs:
            raise ValueError("no checkpoint under runs/ to resume; give --output-dir, or drop --resume")
        return max(runs, key=lambda d: os.path.getmtime(checkpoints(d)[-1]))
    if args.resume:
        return os.path.dirname(os.path.normpath(args.resume))
    return os.path.join("runs", f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")


def init_distributed(args):
    """Under torchrun (RANK is set): one process per GPU, NCCL on GPUs and gloo on CPUs."""
    if "RANK" not in os.environ:
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")


def setup(args):
    """Everything that can fail for reasons outside the code, each failure one clear sentence."""
    check(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("agrpo: CUDA is not available here. LLaDA-8B needs a GPU (see README); "
                         "for an offline CPU run use --model toy --device cpu")
    init_distributed(args)
    size = world()[1]
    if args.prompts_per_step % size or args.prompts_per_step // size * args.group_size % args.micro_batch_size:
        raise ValueError(f"{size} processes need --prompts-per-step divisible by {size}, and --micro-batch-size "
                         f"dividing each process's {args.prompts_per_step // size} x {args.group_size} "
                         "completions")
    try:
        train = [] if args.eval_only else \
            tasks.load_examples(args.task, "train", args.data, n=args.train_examples or None, seed=args.seed)
        test = tasks.load_examples(args.task, "test", args.data, n=args.eval_examples or None) \
            if args.eval_every or args.eval_only else []
    except tasks.DataUnavailable as e:
        raise SystemExit(f"agrpo: {e}")
    if not (train or args.eval_only):
        raise ValueError(f"no training examples for {args.task}")
    try:
        model, tokenizer = load_model_and_tokenizer(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"agrpo: could not load model {args.model!r} ({str(e).splitlines()[0][:200]}). Check "
                         "the name and the network (or HF_HOME cache), or use --model toy for an offline run")
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer, train, test


def enable_activation_checkpointing(model):
    """Recompute each layer's activations in the backward pass: less memory, about a third more compute."""
    if hasattr(getattr(model, "model", None), "set_activation_checkpointing"):  # LLaDA's remote code
        model.model.set_activation_checkpointing("whole_layer")
    elif getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError("this model offers no activation checkpointing; drop --activation-checkpointing")


def main(argv=None):
    try:
        args = parse_args(argv)
        model, tokenizer, train, test = setup(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"agrpo: {e}")
    from transformers import get_cosine_schedule_with_warmup
    rank, size = world()
    steps = args.max_steps if args.max_steps > 0 else \
        math.ceil(args.num_train_epochs * len(train) / args.prompts_per_step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    updates = steps * args.num_iterations  # scheduler steps: one per gradient step on a batch
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * updates), updates)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    step, prompts_seen = load_checkpoint(args.resume, model, optimizer, schedule, args) if args.resume else (0, 0)
    if args.export:
        if rank == 0:
            export(model, tokenizer, args.export)
            print(f"exported the merged model to {args.export}")
        return
    if size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    log_path = os.path.join(args.output_dir, "metrics.jsonl")
    if args.eval_only:
        metrics = evaluate_all(model, tokenizer, test, args, step)
        if rank == 0:
            print(json.dumps(metrics, indent=1))
        return metrics
    if not args.resume and rank == 0 and (checkpoints(args.output_dir) or os.path.exists(log_path)):
        raise SystemExit(f"agrpo: {args.output_dir} already holds a run; continue it with --resume latest "
                         "or choose another --output-dir")
    if rank == 0:
        forget_after(log_path, step)
        print(f"AGRPO on {args.task}: {len(train)} prompts, steps {step + 1}..{steps} of {args.prompts_per_step} "
              f"x {args.group_size} completions on {size} process(es), "
              f"{sum(p.numel() for p in trainable):,} trainable parameters")
    if args.eval_every and step == 0:  # the starting point of the curve
        log_metrics(log_path, 0, evaluate_all(model, tokenizer, test, args, 0))
    bar = tqdm(range(step + 1, steps + 1), desc="AGRPO", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        torch.manual_seed(keyed_seed(args, step, rank))  # LoRA dropout
        batch = prompts_at(train, args.seed, prompts_seen, args.prompts_per_step)
        prompts_seen += args.prompts_per_step
        metrics = rl_step(model, tokenizer, optimizer, schedule, batch, args, step)
        if args.eval_every and (step % args.eval_every == 0 or step == steps):
            metrics.update(evaluate_all(model, tokenizer, test, args, step))
        log_metrics(log_path, step, metrics)
        if rank == 0:
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            len=f"{metrics['completion_length']:.0f}",
                            gen=f"{metrics['seconds_generate']:.1f}s", train=f"{metrics['seconds_train']:.1f}s")
            if step == steps or (args.save_every and step % args.save_every == 0):
                save_checkpoint(model, optimizer, schedule, step, prompts_seen, args)
    if rank == 0:
        print(f"done: metrics in {log_path}, checkpoints in {args.output_dir}")
    if size > 1:
        dist.barrier()  # let rank 0 finish writing before any process leaves
        del model  # DDP's reducer goes before its process group
        dist.destroy_process_group()


def log_metrics(log_path, step, metrics):
    if world()[0] == 0:
        with open(log_path, "a") as log:
            log.write(json.dumps({"step": step, **metrics}) + "\n")


def forget_after(log_path, step):
    """Drop the metric lines of steps after `step`, left by a run that crashed before its next checkpoint
    (and a last line cut short by the crash)."""
    if os.path.exists(log_path):
        with open(log_path) as f:
            lines = f.read().splitlines(keepends=True)
        with open(log_path, "w") as f:
            f.writelines(line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step)


if __name__ == "__main__":
    main()
