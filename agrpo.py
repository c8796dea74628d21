"""AGRPO: policy gradients for masked diffusion language models, in one file.

Reference implementation of "Simple Policy Gradients for Reasoning with Diffusion Language Models" (A. Zhan,
arXiv 2510.04019). The method comes first, in the paper's order: 1 config, 2 loading, 3 the sampler (generation
as a Markov decision process over denoising steps), 4 rewards and group advantages, 5 the policy gradients
(AGRPO's Monte Carlo estimator beside diffu-GRPO's biased mean-field one), 6 training, 7 evaluation. The
plumbing follows, none of it AGRPO. `python agrpo.py --help` explains every flag, and
`python agrpo.py --task countdown --model toy --device cpu` runs the whole method offline on a CPU.
"""
import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
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
# 1. Config: every hyperparameter, the authors' settings as defaults
def arg(default, help, group=None):
    """A field of Args: its default and its --help text; `group` starts a new --help section at this field."""
    return field(default=default, metadata={"help": help, "group": group})

@dataclass
class Args:
    task: Literal["countdown", "gsm8k", "math500", "sudoku"] = arg("countdown", "Task to train on (reward.py).",
                                                                   group="task and model")
    model: str = arg("GSAI-ML/LLaDA-8B-Instruct", "Hub id or local path of a masked diffusion LM; 'toy' builds "
                     "a tiny one offline and changes the defaults marked 'toy' to a CPU-sized run.")
    data: Literal["hub", "synthetic"] = arg("hub", "Where examples come from: the paper's hub data sets, or "
                                            "seeded offline generators (countdown, sudoku).")
    toy_warmup_steps: int = arg(2000, "--model toy only, not AGRPO: supervised masked-diffusion steps that give "
                                "the random toy a start that earns reward, cached in $XDG_CACHE_HOME/agrpo (0: none).")
    gsm8k_test: Literal["platinum", "openai"] = arg("platinum", "GSM8K test set: madrylab/gsm8k-platinum (the "
                                                    "authors' choice, label errors fixed) or openai/gsm8k.")
    device: str = arg("cuda", "Torch device: cuda, cuda:N or cpu.")
    dtype: Literal["bfloat16", "float32"] = arg("bfloat16", "Model weights' dtype.")
    mask_token_id: int = arg(126336, "Id of the mask token (LLaDA: 126336).")
    eos_token_id: Optional[int] = arg(None, "Id of EOS; default: the model config's.")
    train_examples: int = arg(0, "Train on the first N training examples only (0: all).")
    seed: int = arg(333, "Seed of every random draw.")
    lora_rank: int = arg(64, "LoRA rank r; 0 trains all weights.", group="LoRA (the authors' adapters)")
    lora_alpha: float = arg(64.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input.")
    lora_targets: str = arg("q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out", "Comma-separated names of "
                            "the linear layers that get adapters (LLaDA's; the toy's are query,key,value,dense).")
    learning_rate: float = arg(5e-6, "AdamW peak learning rate.", group="optimisation")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.99, "AdamW beta2.")
    weight_decay: float = arg(0.01, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Gradient-norm clip.")
    warmup_ratio: float = arg(0.01, "Share of the schedule warmed up linearly before the cosine decay.")
    num_train_epochs: float = arg(5.0, "Passes over the training prompts (unless --max-steps sets the length).")
    max_steps: Optional[int] = arg(None, "Training steps; default: as many as --num-train-epochs takes.")
    prompts_per_step: int = arg(16, "Prompts per training step, over all processes (the authors: 16).")
    micro_batch_size: int = arg(8, "Completions per forward pass on one process (gradients accumulate).")
    update_schedule: Literal["paper", "released"] = arg("paper", "'paper': one optimizer update per gradient step. "
        "'released': as the authors' trainer ran (8 GPUs, gradient accumulation 2), whatever the number of processes "
        "here: accumulate the even micro-batches, then update after each sampled step of the odd ones (see README).")
    group_size: int = arg(8, "Completions per prompt, G.", group="rollouts (generation as a denoising MDP)")
    completion_length: int = arg(384, "Completion length C.")
    block_length: int = arg(12, "Semi-autoregressive block length BL.")
    sampling_steps: int = arg(128, "Denoising steps T; each reveals C/T tokens.")
    unmasking: Literal["random", "low_confidence"] = arg("random", "Which masked positions a step reveals.")
    temperature: float = arg(0.6, "Sampling temperature (> 0 for training).")
    top_p: float = arg(0.99, "Nucleus truncation of the support (1 = off).")
    top_k: int = arg(150, "Top-k truncation of the support (0 = off).")
    estimator: Literal["agrpo", "diffu-grpo"] = arg("agrpo", "The policy gradient: AGRPO's unbiased Monte Carlo "
        "estimator, or d1's diffu-GRPO (one-step mean-field log-probs, biased), the baseline the paper improves on.",
        group="the estimator and the objective")
    mc_samples: int = arg(24, "AGRPO: sampled timesteps M per completion.")
    importance_sampling: Literal["entropy", "uniform"] = arg("entropy", "AGRPO: distribution q over timesteps.")
    low_discrepancy: bool = arg(True, "AGRPO: stratify the batch's uniforms before the inverse CDF of q.")
    p_mask_prompt: float = arg(0.15, "diffu-GRPO: probability of masking each prompt token (d1's runs: 0.15).")
    epsilon: float = arg(0.2, "PPO clip range eps.")
    beta: float = arg(0.0, "Weight of the k3 KL to the reference (adapters off; needs --lora-rank > 0).")
    num_iterations: int = arg(1, "Gradient steps per batch of rollouts (diffu-GRPO's mu; d1: 12).")
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
    eval_top_p: float = arg(1.0, "Nucleus truncation for a sampled evaluation (1 = off).")
    eval_top_k: int = arg(0, "Top-k truncation for a sampled evaluation (0 = off).")
    eval_batch_size: int = arg(16, "Test prompts per forward pass.")
    eval_examples: int = arg(0, "Evaluate on the first N test examples only (0: all).")
    output_dir: Optional[str] = arg(None, "The run's directory; default: a new runs/<task>-<date>-<time>.",
                                    group="runs and checkpoints")
    save_every: int = arg(15, "Save a checkpoint every N steps (and at the end; 0: only at the end).")
    keep_checkpoints: int = arg(3, "Keep the newest N checkpoints.")
    resume: Optional[str] = arg(None, "Continue a run with its saved settings (flags typed here override them): "
                                "'latest' (the newest run under runs/, of --task if typed, or --output-dir), a "
                                "run directory or a checkpoint directory.")
    export: Optional[str] = arg(None, "Write the model (adapters merged, transformers format) to this new "
                                "directory and exit; with --resume, the trained one.")

    @property
    def eval_steps(self):
        return [int(t) for t in self.eval_sampling_steps.split(",")]


# ----------------------------------------------------------------------------------------------------------
# 2. Loading: LLaDA-8B-Instruct, plain LoRA
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A dropout(x), with W frozen and B = 0 at the start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale, self.enabled, self.dropout = base, alpha / rank, True, nn.Dropout(dropout)
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

def swap_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)

def add_lora(model, args):
    """Freeze the model and wrap every linear layer named in --lora-targets (no peft needed)."""
    model.requires_grad_(False)
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    hits = [(name, m) for name, m in linear if name.rsplit(".", 1)[-1] in args.lora_targets.split(",")]
    require(hits, f"--lora-targets {args.lora_targets}: no linear layer of this model has such a name; its layers "
            f"are named {', '.join(sorted({n.rsplit('.', 1)[-1] for n, _ in linear}))} (pick some), or use "
            "--lora-rank 0 to train every weight")
    tied = [name for name, m in hits if m.weight is model.get_input_embeddings().weight]
    # merging an adapter into a tied output layer would change the input embeddings too
    require(not tied, f"{tied and tied[0]} shares its weight with the input embeddings; leave it out of "
            "--lora-targets")
    for name, module in hits:
        swap_module(model, name, LoRALinear(module, args.lora_rank, args.lora_alpha, args.lora_dropout))
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

def load_model_and_tokenizer(args, warm_up=True):
    """LLaDA-8B-Instruct (remote code, bf16), a model this program exported, or the toy model (with its warm-up
    unless `warm_up` is off), with adapters if --lora-rank > 0; fills args.eos_token_id."""
    model, tokenizer = toy_model_and_tokenizer(args.seed) if args.model == "toy" else from_pretrained(args)
    if args.eos_token_id is None:
        args.eos_token_id = model.config.eos_token_id if model.config.eos_token_id is not None \
            else tokenizer.eos_token_id
    vocabulary = model.get_input_embeddings().num_embeddings
    require(args.mask_token_id < vocabulary, f"--mask-token-id {args.mask_token_id} is not in the model's "
            f"vocabulary of {vocabulary}; set it (the tokenizer's mask token is {tokenizer.mask_token_id})")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.model == "toy" and args.toy_warmup_steps and warm_up:
        warm_up_toy(model, tokenizer, args)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    return (add_lora(model, args) if args.lora_rank > 0 else model), tokenizer


# ----------------------------------------------------------------------------------------------------------
# 3. Masked diffusion sampler: generation as a Markov decision process over denoising steps
@dataclass
class Rollout:
    """B completions of length C and, per completion token, what the policy gradient needs."""
    prompt_ids: torch.Tensor             # (B, P) left-padded prompts
    prompt_mask: Optional[torch.Tensor]  # (B, P) 1 on real prompt tokens (None: no padding in the batch)
    tokens: torch.Tensor                 # (B, C) completion ids
    revealed_at: torch.Tensor            # (B, C) the denoising step t that revealed the token; T: none (filler)
    positions: torch.Tensor              # (B, T, k) the k positions revealed at each step
    logp: torch.Tensor                   # (B, C) log pi_old(token | s_t), truncated and tempered
    entropy: torch.Tensor                # (B, C) entropy of that distribution
    support: Optional[torch.Tensor]      # (B, C, K) candidate ids, most probable first (None: no truncation)
    support_size: torch.Tensor           # (B, C) the support S_i is support[..., :support_size]

def truncated_logits(logits, args):
    """softmax(logits / temperature) restricted to S_i: top-k, then top-p on the renormalised top-k. Returns the
    candidates' tempered logits (-inf outside S_i), their ids, and |S_i|. With top-p alone the candidates are cut
    to the widest nucleus of the batch, never the whole vocabulary."""
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
    return z.masked_fill(torch.arange(K, device=z.device) >= size[..., None], -math.inf), ids, size

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
    k, steps_per_block, dev = C // T, T // (C // BL), prompt_ids.device
    x = torch.cat([prompt_ids, torch.full((B, C), args.mask_token_id, device=dev)], 1)
    prompt_mask = None if prompt_mask.all() else prompt_mask  # unpadded: no mask, so fused attention kernels
    revealed_at = torch.full((B, C), T, device=dev)  # T: revealed by no step (yet)
    positions = torch.zeros(B, T, k, dtype=torch.long, device=dev)
    logp, entropy = torch.zeros(B, C, device=dev), torch.zeros(B, C, device=dev)
    V = model.get_input_embeddings().num_embeddings
    truncated = args.temperature > 0 and (args.top_p < 1 or 0 < args.top_k < V)
    support = torch.zeros(B, C, 0, dtype=torch.long, device=dev) if truncated else None  # widened as needed
    support_size = torch.ones(B, C, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)  # rows still generating
    for t in range(T):
        if t % steps_per_block == 0:  # a new block, lo .. lo + BL - 1, for the rows still generating
            lo = t // steps_per_block * BL
            block = torch.arange(P + lo, P + lo + BL, device=dev).expand(len(rows), -1)
            attention, r = with_completion(prompt_mask, C, rows), rows[:, None]
        # 1. one forward pass on s_t; 2. a draw at every position of the block
        draw = sample_tokens(logits_at(model, x[rows], attention, block), args, generator)
        # 3. k positions still masked (a sampled mask id counts as revealed): the most confident, or random
        priority = draw.confidence if args.unmasking == "low_confidence" else \
            torch.rand(draw.confidence.shape, device=dev, generator=generator)
        j = priority.masked_fill(revealed_at[rows, lo:lo + BL] < T, -math.inf).topk(k, dim=-1).indices  # (R, k)
        # 4. reveal them, and record what the policy gradient needs
        x[r, P + lo + j] = draw.tokens.gather(1, j)
        revealed_at[r, lo + j], positions[rows, t] = t, lo + j
        logp[r, lo + j], entropy[r, lo + j] = draw.logp.gather(1, j), draw.entropy.gather(1, j)
        support_size[r, lo + j] = draw.support_size.gather(1, j)
        if support is not None:
            K = draw.support.shape[-1]
            support = nn.functional.pad(support, (0, max(K - support.shape[-1], 0)))
            support[r, lo + j, :K] = draw.support.gather(1, j[..., None].expand(-1, -1, K))
        if (t + 1) % steps_per_block == 0:  # 5. the block is complete: one all EOS ends its row
            done = (x[rows, P + lo:P + lo + BL] == args.eos_token_id).all(-1)
            x[rows[done], P + lo + BL:] = args.eos_token_id  # the rest is EOS filler, revealed by no step
            rows = rows[~done]
            if len(rows) == 0:
                break
    return Rollout(prompt_ids, prompt_mask, x[:, P:], revealed_at, positions, logp, entropy, support, support_size)


# ----------------------------------------------------------------------------------------------------------
# 4. Rewards (reward.py) and group-relative advantages
def grade(tokenizer, completions, examples, args):
    """Decode completions (N, C) and grade each with reward.py: the parts of the shaped reward ("format",
    "correct"), the evaluation score ("score", is_correct), the answer the grader read and the text."""
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [dict(reward.reward_parts(args.task, text, ex), score=reward.is_correct(args.task, text, ex), text=text)
            for text, ex in zip(texts, examples)]

def group_advantages(rewards, group_size, scale="none"):
    """A_i = R_i - mean of its group of G (the authors'); 'std' also divides by the group's standard deviation
    (GRPO's). With the group mean as baseline, E[A_i grad log p_i] = (1 - 1/G) grad J."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(1, keepdim=True)
    return (a / (r.std(1, keepdim=True) + 1e-4) if scale == "std" else a).flatten()


# ----------------------------------------------------------------------------------------------------------
# 5. Policy gradients: AGRPO's amortized Monte Carlo estimator, and diffu-GRPO's mean-field one beside it
def trajectory_length(rollout, args):
    """L = (last step that revealed a non-EOS token) + 1; 0 for a completion of nothing but EOS."""
    return rollout.revealed_at.masked_fill(rollout.tokens == args.eos_token_id, -1).max(1).values + 1

def sample_timesteps(rollout, L, args, generator=None):
    """Draw M steps per completion from q over 0..L-1 and return them with weights 1 / (L q(t)). q is uniform, or
    proportional to the entropy revealed at each step; the B*M uniforms are stratified, (randperm + U) / (B*M),
    when low_discrepancy is on. Completions with L = 0 get weight 0."""
    B, M, T, dev = L.numel(), args.mc_samples, args.sampling_steps, L.device
    u = torch.rand(B * M, dtype=torch.float64, device=dev, generator=generator)
    if args.low_discrepancy:
        u = (torch.randperm(B * M, device=dev, generator=generator) + u) / (B * M)
    live = torch.arange(T, device=dev) < L[:, None]  # steps 0..L-1
    if args.importance_sampling == "entropy":
        # the EOS filler (revealed at T, by no step) lands on step T - 1 with entropy 0: it adds no mass
        mass = torch.zeros(B, T, dtype=torch.float64, device=dev).scatter_add_(
            1, rollout.revealed_at.clamp(max=T - 1), rollout.entropy.double())
        mass = (mass + 1e-8) * live  # + 1e-8: q(t) > 0 on every live step, as unbiasedness needs
    else:
        mass = live.double()
    q = mass / mass.sum(1, keepdim=True).clamp_min(1e-30)
    t = torch.searchsorted(q.cumsum(1), u.view(B, M))  # the inverse CDF of q
    t = t.clamp(max=(L - 1).clamp_min(0)[:, None])  # a u that rounding puts past the last cumulative sum
    weight = torch.where(L[:, None] > 0, 1 / (L[:, None] * q.gather(1, t)).clamp_min(1e-30), 0.0)
    return t, weight.float()

def step_logprobs(model, rollout, t, args):
    """log pi(x_i | s_t) of the k tokens each completion revealed at its step t (B,), under the recorded support
    and temperature; s_t is rebuilt by re-masking every token revealed at step >= t (the EOS filler, marked T,
    included). Returns log-probs and positions, both (B, k)."""
    pos = rollout.positions[torch.arange(len(t), device=t.device), t]
    state = rollout.tokens.masked_fill(rollout.revealed_at >= t[:, None], args.mask_token_id)
    ids, attention = torch.cat([rollout.prompt_ids, state], 1), with_completion(rollout.prompt_mask, state.shape[1])
    z = logits_at(model, ids, attention, rollout.prompt_ids.shape[1] + pos).float() / args.temperature
    if rollout.support is None:
        norm = z.logsumexp(-1)
    else:
        K = rollout.support.shape[-1]
        cand = z.gather(-1, rollout.support.gather(1, pos[..., None].expand(-1, -1, K)))
        outside = torch.arange(K, device=z.device) >= rollout.support_size.gather(1, pos)[..., None]
        norm = cand.masked_fill(outside, -math.inf).logsumexp(-1)
    return z.gather(-1, rollout.tokens.gather(1, pos)[..., None]).squeeze(-1) - norm, pos

def clipped_surrogate(logp, old_logp, advantages, args):
    """The per-token PPO-clipped term -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - logp_old); and r."""
    ratio = (logp - old_logp).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - args.epsilon, 1 + args.epsilon) * advantages), ratio

def k3(ref_logp, logp):
    """The k3 estimate of KL(pi || ref) at a token drawn from pi."""
    return (ref_logp - logp).exp() - (ref_logp - logp) - 1

def agrpo_losses(model, rollout, advantages, args, generator=None):
    """AGRPO's loss on a micro-batch as M losses, one per sampled step, each back-propagated at once (memory stays
    flat in M): rebuild s_t, recompute the log-probs of the tokens revealed at t, PPO-clip them (plus beta times
    the k3 KL to the reference), weight by 1 / (L q(t)). Over the M losses a completion's terms estimate its step
    average (1/L) sum_t; the sum is over groups, each the mean of its G completions. Yields (loss, (r, A, k3))."""
    t, weight = sample_timesteps(rollout, trajectory_length(rollout, args), args, generator)
    for m in range(args.mc_samples):
        logp, pos = step_logprobs(model, rollout, t[:, m], args)
        adv = advantages[:, None].expand_as(logp)
        term, ratio = clipped_surrogate(logp, rollout.logp.gather(1, pos), adv, args)
        kl = None
        if args.beta > 0:
            with torch.no_grad(), adapters_off(model):
                ref = step_logprobs(model, rollout, t[:, m], args)[0]
            kl = k3(ref, logp)
            term = term + args.beta * kl * ratio  # times r: tokens drawn from pi_old, E_old[r grad k3] = grad KL
        yield (term * weight[:, m, None]).sum() / (args.mc_samples * args.group_size), (ratio, adv, kl)

# diffu-GRPO (d1, Zhao et al. 2025), the baseline the paper argues against, as d1's code computes it.
def mask_prompt(prompt_ids, args, generator):
    """diffu-GRPO's input noise: each prompt token (padding too) masked with probability p_mask_prompt."""
    noise = torch.rand(prompt_ids.shape, device=prompt_ids.device, generator=generator)
    return prompt_ids.masked_fill(noise < args.p_mask_prompt, args.mask_token_id)

def mean_field_logprobs(model, masked_prompt, tokens, args):
    """diffu-GRPO's estimate of log pi(x_i) at every completion position: one forward pass on the masked prompt
    and an all-mask completion, log-softmax of the raw logits (temperature 1, no truncation, no attention mask).
    Biased: it scores every token as if all were predicted at once from the prompt alone, ignoring the order in
    which the sampler revealed them and the partly revealed states each was drawn in."""
    P, C = masked_prompt.shape[1], tokens.shape[1]
    ids = torch.cat([masked_prompt, torch.full_like(tokens, args.mask_token_id)], 1)
    z = logits_at(model, ids, None, torch.arange(P, P + C, device=ids.device).expand(len(ids), -1)).float()
    return z.gather(-1, tokens[..., None]).squeeze(-1) - z.logsumexp(-1)

def token_shares(tokens, args):
    """diffu-GRPO's token mean: the tokens up to and including a completion's first EOS count, each 1 / (the
    tokens its group of G counts); later tokens 0. `tokens` holds whole groups."""
    eos = (tokens == args.eos_token_id).long()
    counted = (eos.cumsum(1) - eos == 0).float()
    per_group = counted.view(-1, args.group_size * tokens.shape[1]).sum(1)
    return counted / per_group.repeat_interleave(args.group_size)[:, None]

def diffu_grpo_losses(model, rollout, advantages, masked_prompt, old_logp, share, args):
    """diffu-GRPO's loss on a micro-batch (one loss, one backward pass): the PPO-clipped term on the mean-field
    log-probs, r against the same estimate under the weights that generated the batch (old_logp; None with one
    gradient step per batch: r = 1), plus beta k3 to the reference without the ratio factor, as d1 adds it; summed
    over groups, each a mean over its counted tokens (share). Yields (loss, stats)."""
    logp = mean_field_logprobs(model, masked_prompt, rollout.tokens, args)
    adv = advantages[:, None].expand_as(logp)
    term, ratio = clipped_surrogate(logp, logp.detach() if old_logp is None else old_logp, adv, args)
    kl = None
    if args.beta > 0:
        with torch.no_grad(), adapters_off(model):
            ref = mean_field_logprobs(model, masked_prompt, rollout.tokens, args)
        kl = k3(ref, logp)
        term = term + args.beta * kl
    counted = share > 0
    yield (term * share).sum(), (ratio[counted], adv[counted], None if kl is None else kl[counted])


# ----------------------------------------------------------------------------------------------------------
# 6. Training: the step and the loop, on one GPU or many (torchrun)
def rl_step(model, tokenizer, optimizer, schedule, prompts, args, step):
    """One training step on this process's share of whole prompt groups: G completions per prompt, their rewards
    and advantages, then num_iterations gradient steps of the chosen estimator. Returns the metrics."""
    rank, world_size = world()
    mine = prompts[rank * len(prompts) // world_size:(rank + 1) * len(prompts) // world_size]
    G, mb = args.group_size, args.micro_batch_size
    examples = [ex for ex in mine for _ in range(G)]
    n, first = len(examples) // mb, rank * len(examples) // mb  # micro-batches first .. first + n - 1 of all
    rows = lambda j: slice(j * mb, (j + 1) * mb)
    clock = time.perf_counter()
    model.eval()
    rollouts = [generate(model, *tokenize_prompts(tokenizer, examples[rows(j)], args), args,
                         stream(args, "rollout", step, first + j)) for j in range(n)]
    synchronize(args)
    seconds, clock = {"generate": time.perf_counter() - clock}, time.perf_counter()
    tokens = torch.cat([r.tokens for r in rollouts])
    graded = grade(tokenizer, tokens, examples, args)
    rewards = torch.tensor([g["format"] + g["correct"] for g in graded])
    advantages = group_advantages(rewards, G, args.scale_rewards).to(args.device)
    seconds["grade"], clock = time.perf_counter() - clock, time.perf_counter()

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    masked = lambda j, i: mask_prompt(rollouts[j].prompt_ids, args, stream(args, "prompt mask", step, i, first + j))
    old = {}  # diffu-GRPO's estimate under the weights that generated the batch, for each iteration's mask
    if args.estimator == "diffu-grpo" and args.num_iterations > 1:
        with torch.no_grad():
            old = {(j, i): mean_field_logprobs(model, masked(j, i), rollouts[j].tokens, args)
                   for i in range(args.num_iterations) for j in range(n)}
    share = token_shares(tokens, args) if args.estimator == "diffu-grpo" else None

    def losses(j, iteration):  # the micro-batch's losses, one per backward pass
        if args.estimator == "agrpo":
            return agrpo_losses(model, rollouts[j], advantages[rows(j)], args,
                                stream(args, "timesteps", step, iteration, first + j))
        return diffu_grpo_losses(model, rollouts[j], advantages[rows(j)], masked(j, iteration),
                                 old.get((j, iteration)), share[rows(j)], args)

    stats, grad_norms = [], []

    def backward(loss, per_token):
        (loss / args.prompts_per_step).backward()  # / all the step's prompts: the gradient is their mean
        ratio, adv, kl = per_token
        with torch.no_grad():
            stats.append(torch.stack([loss / args.prompts_per_step, ((ratio < 1 - args.epsilon) & (adv < 0))
                                      .float().mean(), ((ratio > 1 + args.epsilon) & (adv > 0)).float().mean(),
                                      ratio.new_zeros(()) if kl is None else kl.mean(), (ratio - 1).abs().max()]))

    def update():
        all_reduce_gradients(trainable)
        grad_norms.append(nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The released trainer (8 processes x 2 micro-batches) updates after each backward pass of every
    # process's second micro-batch: here, of every odd one, whatever the number of processes.
    late = [j for j in range(n) if args.update_schedule == "released" and (first + j) % 2]
    for iteration in range(args.num_iterations):
        stats.clear()  # the metrics of the last iteration are the ones reported
        for j in range(n):
            if j not in late:
                for loss in losses(j, iteration):
                    backward(*loss)
        if args.update_schedule == "paper":
            update()
        else:
            pending = [losses(j, iteration) for j in late]
            for _ in range(args.mc_samples if args.estimator == "agrpo" else 1):
                for micro_batch in pending:
                    backward(*next(micro_batch))
                update()
        schedule.step()  # once per iteration in both schedules: the released one's updates share one rate
    synchronize(args)
    seconds["train"] = time.perf_counter() - clock
    return step_metrics(rewards, graded, advantages, tokens, stats, grad_norms, schedule, seconds, args)

def train(model, tokenizer, train_examples, test_examples, args):
    """The loop: training steps, evaluations, metrics and checkpoints, from the start or from --resume."""
    from transformers import get_cosine_schedule_with_warmup
    rank, world_size = world()
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * len(train_examples) / args.prompts_per_step)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable if world_size > 1 else []:  # every process starts from the first one's weights
        dist.broadcast(p.data, 0)
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    updates = total_steps * args.num_iterations  # scheduler steps: one per gradient step on a batch
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * updates), updates)
    step, prompts_seen, elapsed = 0, 0, 0.0
    if is_checkpoint(args.resume):
        step, prompts_seen, elapsed = resume_training(model, optimizer, schedule, total_steps, args)
    log = metrics_log(args.output_dir, step)
    say(f"{args.estimator} on {args.task}: steps {step + 1}..{total_steps} of {args.prompts_per_step} prompts x "
        f"{args.group_size} completions on {world_size} process(es), {sum(p.numel() for p in trainable):,} "
        f"trainable parameters; run directory {args.output_dir}")
    started, done, saved = time.time() - elapsed, step, step
    save = lambda: save_checkpoint(model, optimizer, schedule, done, prompts_seen, time.time() - started,
                                   total_steps, args)
    bar = tqdm(range(step + 1, total_steps + 1), desc=args.estimator, dynamic_ncols=True, disable=rank > 0)
    try:
        if args.eval_every and step == 0:  # the starting point of the curve
            log(0, evaluate(model, tokenizer, test_examples, args, 0))
        for step in bar:
            stop_if_asked(args)  # Ctrl-C: the loop stops between steps
            torch.manual_seed(seed_of(args, "dropout", step, rank))  # LoRA dropout
            batch = prompts_at(train_examples, args.seed, prompts_seen, args.prompts_per_step)
            metrics = rl_step(model, tokenizer, optimizer, schedule, batch, args, step)
            done, prompts_seen = step, prompts_seen + args.prompts_per_step
            log(step, {**metrics, "prompts_seen": prompts_seen, "elapsed_seconds": time.time() - started})
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                            gen=f"{metrics['seconds_generate']:.1f}s", train=f"{metrics['seconds_train']:.1f}s")
            if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
                log(step, evaluate(model, tokenizer, test_examples, args, step))
            if step == total_steps or (args.save_every and step % args.save_every == 0):
                saved = save()
    except Stop:
        bar.close()
        stopped(done, total_steps, save if done > saved else None, args)
    bar.close()
    if rank == 0:
        plot_curves(args.output_dir)
        say(summary(args.output_dir, time.time() - started))


# ----------------------------------------------------------------------------------------------------------
# 7. Evaluation (the authors': C=256, BL=32, T=128, low_confidence, greedy)
@torch.no_grad()
def evaluate(model, tokenizer, examples, args, step, name="eval"):
    """Decode the test prompts with the evaluation settings at each T of --eval-sampling-steps and grade them. Each
    process takes every world_size-th example; rank 0 writes <run>/<name>-step<step>-T<T>.jsonl, a line per example
    in the test set's order with the reference and the answer the grader read, so that a score can be audited."""
    rank, world_size = world()
    model.eval()
    mine, metrics = examples[rank::world_size], {}
    # batches of prompts of similar length, so that few are padded (padding costs a mask: with_completion)
    prompts = tokenizer(prompt_texts(tokenizer, mine, args), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(mine)), key=lambda j: len(prompts[j]))
    for T in args.eval_steps:
        eval_args = dataclasses.replace(args, completion_length=args.eval_completion_length, sampling_steps=T,
                                        block_length=args.eval_block_length, unmasking=args.eval_unmasking,
                                        temperature=args.eval_temperature, top_p=args.eval_top_p, top_k=args.eval_top_k)
        rows, seconds = [], 0.0
        for i in tqdm(range(0, len(mine), args.eval_batch_size), desc=f"eval T={T}", disable=rank > 0, leave=False):
            index = order[i:i + args.eval_batch_size]
            chunk, clock = [mine[j] for j in index], time.perf_counter()
            rollout = generate(model, *tokenize_prompts(tokenizer, chunk, args), eval_args,
                               stream(args, "evaluation", T, rank, i))
            synchronize(args)
            seconds += time.perf_counter() - clock
            lengths = (rollout.tokens != args.eos_token_id).sum(1).tolist()
            rows += [{"index": rank + world_size * j, "question": ex["question"], "reference": reward.reference(
                      args.task, ex), "answer": g["answer"], "score": g["score"], "length": n, "completion": g["text"]}
                     for j, ex, g, n in zip(index, chunk, grade(tokenizer, rollout.tokens, chunk, args), lengths)]
        rows, seconds = gather_rows(rows, seconds)
        path = os.path.join(args.output_dir, f"{name}-step{step}-T{T}.jsonl")
        if rank == 0:
            write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
        n = max(len(rows), 1)
        metrics.update({f"eval_T{T}_accuracy": sum(r["score"] for r in rows) / n,
                        f"eval_T{T}_completion_length": sum(r["length"] for r in rows) / n,
                        f"eval_T{T}_seconds_per_completion": seconds / n})
        say(f"step {step}: evaluation accuracy {metrics[f'eval_T{T}_accuracy']:.1%} at T={T} on {len(examples)} "
            f"problems ({path})")
    return metrics


# ==========================================================================================================
# Plumbing, not AGRPO: the method's helpers, the toy model, runs and checkpoints, signals, curves, flags.

# ----------------------------------------------------------------------------------------------------------
# What the method calls, named for what it does: processes, random streams, prompts, logits, metrics, the hub
def world():
    """(rank, number of processes); torchrun starts one process per GPU."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

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

def seed_of(args, purpose, *index):
    """The seed of one random stream: its purpose ("rollout", "timesteps", "prompt mask", "dropout", "evaluation")
    and its index (the training step, the global micro-batch, ...). Results do not depend on the number of
    processes, and a resumed run needs no RNG state."""
    return random.Random(str((args.seed, purpose, *index))).getrandbits(63)

def stream(args, purpose, *index):
    return torch.Generator(args.device).manual_seed(seed_of(args, purpose, *index))

def with_completion(prompt_mask, C, rows=slice(None)):
    """The attention mask of prompt + completion, or None when no prompt is padded: LLaDA turns any mask into
    an additive bias (ruling out fused attention kernels) and checks it on the host every forward."""
    if prompt_mask is None:
        return None
    mask = prompt_mask[rows]
    return torch.cat([mask, mask.new_ones(mask.shape[0], C)], 1)

def logits_at(model, input_ids, attention_mask, positions):
    """Logits (B, n, V) at `positions` (B, n) only: the output layer is fed just those hidden states, so the
    full (B, length, V) logits are never built (for any model whose output layer is a module)."""
    head = model.get_output_embeddings()
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

@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order

def prompts_at(examples, seed, position, count):
    """Prompts number position .. position + count - 1 of an endless stream that visits the examples in a fresh
    seeded order every epoch."""
    return [examples[epoch_order(len(examples), seed, p // len(examples))[p % len(examples)]]
            for p in range(position, position + count)]

def step_metrics(rewards, graded, advantages, tokens, stats, grad_norms, schedule, seconds, args):
    """A training step's metrics (README: "Metrics and curves"), over all processes."""
    spread = rewards.view(-1, args.group_size).std(1)
    mean = lambda key: sum(g[key] for g in graded) / len(graded)
    loss, clip_low, clip_high, kl, ratio_max_dev = torch.stack(stats).T
    metrics = over_ranks({
        "reward": rewards.mean(), "reward_format": mean("format"), "reward_correct": mean("correct"),
        "accuracy": mean("score"), "reward_std": spread.mean(), "zero_spread_groups": (spread == 0).double().mean(),
        "advantage_abs": advantages.abs().mean(), "advantage_min": advantages.min(), "advantage_max": advantages.max(),
        "completion_length": (tokens != args.eos_token_id).sum(1).double().mean(),
        "loss": loss.sum() * world()[1],  # x processes: the mean over processes is then their sum
        "clip_low": clip_low.mean(), "clip_high": clip_high.mean(), "kl": kl.mean(),
        "grad_norm": torch.stack(grad_norms).mean(), "lr": schedule.get_last_lr()[0],
        **{f"seconds_{k}": v for k, v in seconds.items()}}, args, "mean")
    peaks = {"ratio_max_dev": ratio_max_dev.max()}
    if args.device.startswith("cuda"):
        peaks["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    metrics.update(over_ranks(peaks, args, "max"))
    completion_tokens = args.prompts_per_step * args.group_size * args.completion_length  # all processes'
    metrics["tokens_per_second"] = completion_tokens / sum(metrics[f"seconds_{k}"] for k in seconds)
    return metrics

def over_ranks(metrics, args, how):
    """The metrics as plain floats, their mean or their max over processes (one process: no tensor, no sync)."""
    values = [float(v) for v in metrics.values()]
    if world()[1] > 1:
        reduced = torch.tensor(values, dtype=torch.float64, device=args.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
        values = (reduced / world()[1] if how == "mean" else reduced).tolist()
    return dict(zip(metrics, values))

def all_reduce_gradients(params):
    """DDP by hand: each gradient becomes the sum of every process's (each loss was divided by the step's prompts
    over all processes, so the sum is the step's mean gradient)."""
    if world()[1] > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

def gather_rows(rows, seconds):
    """Every process's evaluation rows, in the test set's order, and the seconds they took, summed."""
    if world()[1] > 1:
        gathered = [None] * world()[1]
        dist.all_gather_object(gathered, (rows, seconds))
        rows, seconds = [r for part, _ in gathered for r in part], sum(s for _, s in gathered)
    return sorted(rows, key=lambda row: row["index"]), seconds

def from_pretrained(args):
    """A hub or local model and its tokenizer: AutoModel for LLaDA's remote code (its config maps AutoModel to the
    LM), AutoModelForMaskedLM for any other masked LM, such as one --export wrote. One sentence (UsageError) when
    it cannot be loaded, at once when it is neither on this machine nor reachable."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    name = args.model
    require(not os.path.isdir(name) or os.path.isfile(os.path.join(name, "config.json")),
            f"--model {name}: the directory holds no config.json; give a model directory or a hub id")
    try:
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=True, local_files_only=True)
        except OSError:  # not on this machine: ask the hub once, before transformers retries it for a minute
            import huggingface_hub
            try:
                huggingface_hub.model_info(name, timeout=10)
            except Exception as e:
                require(getattr(e, "response", None) is not None,  # no answer at all
                        f"--model {name} is not on this machine and the Hugging Face Hub cannot be reached "
                        f"({type(e).__name__}); check the network, or use --model toy for an offline run")
            config = AutoConfig.from_pretrained(name, trust_remote_code=True)
        model_class = AutoModel if "AutoModel" in (getattr(config, "auto_map", None) or {}) else AutoModelForMaskedLM
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True, padding_side="left")
        return model_class.from_pretrained(name, trust_remote_code=True, dtype=getattr(torch, args.dtype)), tokenizer
    except (OSError, ImportError, ValueError) as e:
        raise UsageError(f"could not load --model {name} ({str(e).strip().splitlines()[0][:200]}); check the "
                         "name, the network or HF_HOME, or use --model toy for an offline run") from None


# ----------------------------------------------------------------------------------------------------------
# The toy model and its supervised warm-up (--model toy): a CPU demo, not part of the method
# The toy's defaults (a typed flag still wins): a CPU-sized run of a few minutes. It evaluates, at the start and the
# end, the policy it trains (sampled at the training temperature, random unmasking): AGRPO improves what the policy
# samples; greedy decoding of a model this small barely moves.
TOY = dict(data="synthetic", device="cpu", dtype="float32", mask_token_id=2, lora_rank=0,
           lora_targets="query,key,value,dense", learning_rate=6e-4, max_steps=150, prompts_per_step=8,
           group_size=8, micro_batch_size=32, completion_length=24, block_length=8, sampling_steps=12,
           mc_samples=4, top_k=0, top_p=1.0, temperature=1.0, eval_every=150, eval_completion_length=24,
           eval_block_length=8, eval_sampling_steps="12", eval_unmasking="random", eval_temperature=1.0,
           eval_batch_size=64)
TOY_THREADS = 2  # the toy's threads, shared by its processes: the 2 cores of the machine this project is built on

def toy_model_and_tokenizer(seed: int):
    """A tiny random bidirectional masked LM (BERT-shaped) and a character tokenizer, built offline. Numbers of up
    to three digits and the answer tags are whole tokens, so the toy can copy them; decoding gives back the same
    text. Toy prompts are the bare question: the chat template drops the system message, whose worked examples a
    model this small cannot use (the real path sends it)."""
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
    """A short supervised start, so that the random toy model earns some reward and the policy gradient has
    something to work on. It is LLaDA's own pre-training objective, masked diffusion, on solved synthetic problems:
    each solved answer, padded with EOS to C, gets a fraction t of its tokens masked (t stratified over the batch),
    and the model predicts them, the loss weighted by 1/t. AdamW, linear decay. The weights are cached on disk,
    keyed by everything that determines them (settings, code, torch), and written atomically."""
    C, steps = args.completion_length, args.toy_warmup_steps
    code = b"".join(open(f, "rb").read() for f in (__file__, reward.__file__))
    key = repr((args.task, args.seed, steps, C, args.mask_token_id, args.eos_token_id, batch, lr, torch.__version__,
                torch.get_num_threads(), hashlib.sha256(code).hexdigest(), model.config.to_json_string(),
                tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template))
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agrpo",
                        f"toy-{args.task}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if os.path.exists(path):
        return model.load_state_dict(torch.load(path, weights_only=True))
    examples = reward.load_examples(args.task, "train", "synthetic", n=min(steps * batch, reward.SYNTHETIC_TRAIN_SIZE),
                                    seed=args.seed)
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


# ----------------------------------------------------------------------------------------------------------
# Runs and checkpoints: a directory a run, atomic saves, exact resume, merged export, the metrics log
STRUCTURE = ("model", "task", "dtype", "lora_rank", "lora_alpha", "lora_targets")  # fixed for a run's life
ACTIONS = ("resume", "export", "eval_only")  # what one command does: never taken from a saved run
RUN_LOCKS = []  # the lock of the run this command writes, held until main() ends

def say(message):
    """Print on the first process only (also before torch.distributed starts)."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(message)

def write_atomically(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)

def read_json(path):
    """The JSON object in a file, or None if it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def checkpoints(run):
    """The run's checkpoint directories, oldest first."""
    names = [d for d in os.listdir(run) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(run) else []
    return [os.path.join(run, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]

def is_checkpoint(path):
    return bool(path) and os.path.isfile(os.path.join(path, "state.pt"))

def is_run(path):
    return os.path.isfile(os.path.join(path, "config.json")) or bool(checkpoints(path))

def readable(checkpoint):
    """Whether a checkpoint's files load: state.pt opened lazily (cheap), its fields there; args.json parsed."""
    try:
        state = torch.load(os.path.join(checkpoint, "state.pt"), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return {"model", "optimizer", "schedule", "step", "prompts_seen"} <= set(state) and \
        read_json(os.path.join(checkpoint, "args.json")) is not None

def find_resume(resume, output_dir, task=None):
    """(run directory, checkpoint to continue from, or None to restart a run that has none) for --resume latest
    (the run under runs/ written to last, of `task` if given, that no other process is writing; or --output-dir)
    | RUN | CHECKPOINT. Unreadable newest checkpoints are passed over, each with one printed line."""
    if is_checkpoint(resume):
        require(readable(resume), f"checkpoint {resume} cannot be read (damaged or cut short); resume from an "
                "earlier checkpoint of its run, or from the run directory (its newest readable checkpoint)")
        return os.path.dirname(os.path.normpath(resume)), resume
    if resume == "latest" and not output_dir:
        runs = [os.path.join("runs", d) for d in os.listdir("runs")] if os.path.isdir("runs") else []
        saved_task = lambda r: (read_json(os.path.join(r, "config.json")) or {}).get("task")
        runs = [r for r in runs if is_run(r) and task in (None, saved_task(r))]
        busy = [r for r in runs if being_written(r)]
        for r in busy:
            say(f"resume: passing over {r}, which another process is writing")
        runs = [r for r in runs if r not in busy]
        require(runs, f"there is no run{f' of {task}' if task else ''} under runs/ to resume"
                f"{' that no other process is writing' if busy else ''}; give its directory, or drop --resume")
        output_dir = max(runs, key=lambda r: max(e.stat().st_mtime for e in os.scandir(r)))
    run = output_dir if resume == "latest" else resume
    require(is_run(run), f"--resume {resume}: {run} holds no run; give a run or checkpoint directory")
    found = checkpoints(run)
    require(found or resume != "latest", f"the newest run, {run}, has no checkpoint yet: restart it with "
            f"--resume {run}, or start a new run without --resume")
    good = [c for c in found if readable(c)]
    require(good or not found, f"no checkpoint of {run} can be read; start a new run")
    for bad in found[found.index(good[-1]) + 1:] if good else []:
        say(f"resume: {bad} cannot be read (damaged or cut short); going on from {good[-1]}")
    return run, (good or [None])[-1]

def lock(run, exclusive=True):
    """run/.lock, locked by this process (exclusive: to write the run), or None while a live process holds it
    exclusively. The operating system drops a lock when its process ends, however it ends: a crashed run is never
    locked. A shared lock only looks: the file is opened read-only, so none is made where there is none."""
    import fcntl
    f = open(os.path.join(run, ".lock"), "a" if exclusive else "r")
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except OSError:  # a file system without locks (some network ones): the run goes on, unguarded
        pass
    return f

def being_written(run):
    """Whether a live process holds run/.lock; a run without one (from before locks), or whose lock file cannot
    be opened, is not in progress."""
    try:
        f = lock(run, exclusive=False)
    except OSError:
        return False
    if f:
        f.close()
    return f is None

def new_run_dir(task):
    """A fresh runs/<task>-<date>-<time>[-N]; mkdir is atomic, so two runs started in one second get two."""
    base = os.path.join("runs", f"{task}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs("runs", exist_ok=True)
    for path in [base] + [f"{base}-{n}" for n in range(2, 10000)]:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
            return path

def open_run(args):
    """Claim this command's run directory, locked, and write the resolved settings there (config.json): a new run
    takes a fresh directory, or an --output-dir that holds no run; a resumed run keeps its own."""
    if not args.resume:
        args.output_dir = args.output_dir or new_run_dir(args.task)
        os.makedirs(args.output_dir, exist_ok=True)
        require(not is_run(args.output_dir) and not os.path.exists(os.path.join(args.output_dir, "metrics.jsonl")),
                f"{args.output_dir} already holds a run: continue it with --resume {args.output_dir}, or choose "
                "another --output-dir")
    f = lock(args.output_dir)
    require(f, f"{args.output_dir} was taken by another run started at the same moment; start again")
    RUN_LOCKS.append(f)
    write_atomically(os.path.join(args.output_dir, "config.json"), json.dumps(dataclasses.asdict(args), indent=1))
    return args.output_dir

def save_checkpoint(model, optimizer, schedule, step, prompts_seen, elapsed, total_steps, args):
    """<run>/checkpoint-<step> (first process only): trainable weights (the adapters under LoRA), optimizer,
    schedule, step, data position, run time and the resolved settings, written into a temporary directory and
    renamed, so that a crash or a full disk mid-write never leaves a checkpoint that loads wrong. The newest
    keep_checkpoints are kept. Returns the step."""
    if world()[0] == 0:
        tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
        try:
            os.makedirs(tmp, exist_ok=True)
            torch.save({"model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                        "prompts_seen": prompts_seen, "elapsed": elapsed, "total_steps": total_steps},
                       os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "args.json"), "w") as f:
                json.dump(dataclasses.asdict(args), f, indent=1)
            os.replace(tmp, os.path.join(args.output_dir, f"checkpoint-{step}"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in checkpoints(args.output_dir)[:-args.keep_checkpoints]:
            shutil.rmtree(old)
    return step

def load_checkpoint(path, model, args, optimizer=None, schedule=None):
    """Restore a checkpoint's weights (and the optimizer and schedule, if given); returns its step, prompts seen,
    seconds run and the training length it was saved with."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location=args.device, weights_only=True)
        weights, step, prompts_seen = state["model"], state["step"], state["prompts_seen"]
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}); resume from an earlier "
                         "checkpoint of its run") from None
    require(set(weights) == {n for n, p in model.named_parameters() if p.requires_grad}, f"checkpoint {path} "
            "holds other trainable weights than this model; resume with the settings it was saved with")
    model.load_state_dict(weights, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    return step, prompts_seen, state.get("elapsed", 0.0), state.get("total_steps")

def resume_training(model, optimizer, schedule, total_steps, args):
    """Restore args.resume to train on. Newer checkpoints of the run may only be unreadable ones: they are set
    aside (renamed *.unreadable, nothing deleted), so that new ones can take their names. A run extended or
    shortened gets its cosine schedule re-sized, in one printed line. Returns (step, prompts seen, seconds)."""
    number = lambda checkpoint: int(os.path.normpath(checkpoint).rsplit("-", 1)[1])
    newer = [c for c in checkpoints(args.output_dir) if number(c) > number(args.resume)]
    require(not any(map(readable, newer)), f"{args.resume} is not the newest checkpoint of {args.output_dir}, and "
            "going on from it would overwrite the newer ones; resume the newest, or use this one with "
            "--eval-only or --export")
    for checkpoint in newer if world()[0] == 0 else []:
        os.replace(checkpoint, checkpoint + ".unreadable")
    step, prompts_seen, elapsed, saved_total = load_checkpoint(args.resume, model, args, optimizer, schedule)
    if saved_total not in (None, total_steps):
        for group, lr_lambda in zip(optimizer.param_groups, schedule.lr_lambdas):
            group["lr"] = group["initial_lr"] * lr_lambda(schedule.last_epoch)
        say(f"resume: the cosine schedule is re-sized from {saved_total} to {total_steps} steps; step {step + 1} "
            f"trains at learning rate {optimizer.param_groups[0]['lr']:.3g}")
    return step, prompts_seen, elapsed

def merge_lora(model):
    """Fold the adapters into the weights, for export as a plain transformers model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            swap_module(model, name, module.merged())
    return model

def export(model, tokenizer, path, source):
    """Fold the adapters into the weights and write a transformers model that from_pretrained loads back (into a
    temporary directory, then renamed)."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merge_lora(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    say(f"exported {source}, adapters merged, to {path}")

def metrics_log(run, step):
    """Cut run/metrics.jsonl back to the steps up to `step`, the checkpoint resumed (none when a run restarts), and
    return the function that appends a line of metrics to it (on the first process)."""
    path = os.path.join(run, "metrics.jsonl")
    if world()[0] == 0 and os.path.exists(path):
        kept = [row for row in read_metrics(path) if 0 < step and row["step"] <= step]
        write_atomically(path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(step, metrics):
        if world()[0] == 0:
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
    return log

def read_metrics(path):
    """The metric lines of a run; a line that is not JSON (damaged by hand) is skipped with one printed line naming
    it, a last line without its newline (cut short by a crash) quietly."""
    rows = []
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and "step" in row and line.endswith("\n"):
                rows.append(row)
            elif line.endswith("\n"):
                say(f"{path}, line {number}: not a metrics line; skipped")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM: stop between steps, save, say how to resume
class Stop(Exception):
    """A signal came (stop_on_signals): raised between training steps."""

STOP_SIGNALS = []

def stop_if_asked(args):
    """Raise Stop if a signal came to this process or, under DDP, to any."""
    if over_ranks({"signals": len(STOP_SIGNALS)}, args, "max")["signals"]:
        raise Stop

@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C (SIGINT) or SIGTERM: stop after the step in progress, save it, print how to resume. A second signal
    stops at once (the checkpoints written are intact: they are written atomically)."""
    def ask(signum, frame):
        if STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        STOP_SIGNALS.append(signum)
        say(f"{signal.Signals(signum).name}: stopping after the step in progress (again to stop at once)")

    STOP_SIGNALS.clear()
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def stopped(done, total_steps, save, args):
    """After Stop: save the last step (`save`, None if it is saved), say how to resume, exit 128 + the signal."""
    if save:
        save()
    launcher = f"torchrun --nproc_per_node {world()[1]} agrpo.py" if world()[1] > 1 else "python agrpo.py"
    say(f"stopped by {signal.Signals(STOP_SIGNALS[0]).name} after step {done} of {total_steps}"
        f"{' (checkpoint saved)' if save else ''}; resume with: {launcher} --resume {args.output_dir}")
    raise SystemExit(128 + STOP_SIGNALS[0])


# ----------------------------------------------------------------------------------------------------------
# Curves and the summary
def plot_curves(run):
    """run/curves.svg: reward, accuracy, evaluation accuracy and completion length against the step, a picture any
    browser opens (nothing to install)."""
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
# The command line: flags, config files, the toy preset, resumed settings, one sentence per usage error
class UsageError(Exception):
    """A setting, file or environment that cannot work: main() prints its one sentence, without a traceback."""

def require(ok, message):
    if not ok:
        raise UsageError(message)

def flag(name):
    return "--" + name.replace("_", "-")

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence through main, naming the nearest flag to a misspelt one
        typo = re.search(r"unrecognized arguments: (--[\w-]+)", message)
        near = difflib.get_close_matches(typo[1], self._option_string_actions, n=1) if typo else []
        raise UsageError(message + (f" (did you mean {near[0]}?)" if near else "") + "; see --help")

def build_parser():
    """One flag per field of Args, grouped as Args is. Every default is SUPPRESS: parsing returns what was typed."""
    parser = Parser(prog="agrpo.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
                    usage="python agrpo.py [config.yaml] [--flag value ...]   (torchrun ... agrpo.py for DDP)",
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="AGRPO: policy gradients for masked diffusion language models. Defaults are the "
                                "authors' settings for LLaDA-8B-Instruct on a GPU.",
                    epilog="examples:\n  python agrpo.py --task countdown\n"
                           "  python agrpo.py --task countdown --model toy --device cpu\n"
                           "  python agrpo.py --task countdown --model toy --device cpu --estimator diffu-grpo\n"
                           "  python agrpo.py my.yaml --learning-rate 1e-5\n  python agrpo.py --resume latest")
    parser.add_argument("config", nargs="?", help="a JSON or YAML file of settings, keys named as the flags "
                        "(with - or _); flags typed as well override it")
    group = parser
    for f in dataclasses.fields(Args):
        group = parser.add_argument_group(f.metadata["group"]) if f.metadata["group"] else group
        shown = [f"{k}: {v}" for k, v in (("default", f.default), ("toy", TOY.get(f.name))) if v is not None]
        options = dict(help=(f.metadata["help"] + (f" ({'; '.join(shown)})" if shown else "")).replace("%", "%%"))
        if f.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(f.type) is Literal:
            options["choices"] = typing.get_args(f.type)
        else:  # int, float, str, or Optional of one of them
            options["type"] = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
            options["metavar"] = {int: "N", float: "X"}.get(options["type"], f.name.split("_")[-1].upper())
        group.add_argument(flag(f.name), **options)
    return parser

def read_config(parser, path, typed_before):
    """The settings of a JSON or YAML file, keys named as the flags (with - or _), checked as typed flags are.
    `typed_before`: the word typed before the file's name (a boolean flag given a value lands here)."""
    import yaml
    if not os.path.isfile(path):
        boolean = isinstance(parser._option_string_actions.get(typed_before), argparse.BooleanOptionalAction)
        raise UsageError(f"{path}: {'a directory, not a' if os.path.isdir(path) else 'no such'} config file"
                         + (f"; {typed_before} takes no value: write {typed_before} or --no-{typed_before[2:]}"
                            if boolean else ""))
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        with open(path) as f:
            settings = json.load(f) if kind == "JSON" else yaml.safe_load(f)
    except (ValueError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        line = getattr(e, "lineno", None) or (mark.line + 1 if mark else "?")
        problem = getattr(e, "msg", None) or getattr(e, "problem", e)
        raise UsageError(f"{path} is not valid {kind} (line {line}: {problem}); fix it, or type the settings as "
                         "flags") from None
    require(isinstance(settings, dict), f"{path} should hold a mapping of settings, like learning_rate: 1.0e-5")
    fields = {f.name: f for f in dataclasses.fields(Args)}
    flags, nulls = [], {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        near = difflib.get_close_matches(name, fields, n=1)
        require(name in fields, f"{path}: {key} is not a setting{f' (did you mean {near[0]}?)' if near else ''}; "
                "see --help")
        if value is None:
            require(type(None) in typing.get_args(fields[name].type), f"{path}: {key} has no value; give one, or "
                    "delete the line")
            nulls[name] = None
        elif fields[name].type is bool:
            require(isinstance(value, bool), f"{path}: {key}: {value!r} is not true or false; write it unquoted")
            flags.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            flags += [flag(name), str(value)]
    try:
        return {**vars(parser.parse_args(flags)), **nulls}
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None

def parse_args(argv=None):
    """The settings, each layer over the ones before: Args' defaults, the --model toy preset, a resumed run's saved
    settings, a config file, the flags typed (parsing returns only what was typed). Validated."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    chosen = vars(parser.parse_args(argv))
    if "config" in chosen:
        path = chosen.pop("config")
        chosen = {**read_config(parser, path, argv[argv.index(path) - 1] if argv.index(path) else ""), **chosen}
    if "num_train_epochs" in chosen:  # asked for: it sets the length, over a preset's or a saved max_steps
        chosen.setdefault("max_steps", None)
    saved = {}
    if chosen.get("resume"):
        run, checkpoint = find_resume(chosen["resume"], chosen.get("output_dir"), chosen.get("task"))
        require(os.path.abspath(chosen.get("output_dir") or run) == os.path.abspath(run), f"--output-dir "
                f"{chosen.get('output_dir')}: a resumed run stays in its own directory, {run}; drop --output-dir")
        require(chosen.get("eval_only") or chosen.get("export") or not being_written(run), f"{run} is being written "
                "by another process; wait for it to end, or stop it with Ctrl-C, then resume it")
        saved = saved_settings(checkpoint or run, chosen)
        chosen.update(output_dir=run, resume=checkpoint or run)  # no checkpoint: the run restarts
        say(f"resume: {checkpoint or run} ({saved.get('task')}, {saved.get('estimator', 'agrpo')})")
    args = Args(**{**(TOY if {**saved, **chosen}.get("model") == "toy" else {}), **saved, **chosen})
    validate(args)
    return args

def saved_settings(path, typed):
    """The settings a run was saved with (a checkpoint's args.json, or the run's config.json), but this command's
    actions. Prints what a typed flag changes; refuses a change of the model's structure."""
    saved = read_json(os.path.join(path, "args.json" if is_checkpoint(path) else "config.json"))
    require(isinstance(saved, dict), f"the settings of {path} cannot be read; resume from another checkpoint")
    saved = {k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)} - set(ACTIONS)}
    for name in sorted(set(typed) & set(saved) - {"output_dir"}):
        if typed[name] != saved[name]:
            require(name not in STRUCTURE, f"{flag(name)} {typed[name]}: {path} was trained with {saved[name]}, "
                    "and a model's structure cannot change on resume; drop the flag")
            say(f"resume: {flag(name)} {saved[name]} -> {typed[name]}")
    return saved

def check_geometry(C, BL, T, flags=("--completion-length", "--block-length", "--sampling-steps")):
    """C/BL blocks, each revealed in T/(C/BL) steps of k = C/T tokens; the error lists the values that fit."""
    if min(C, BL) <= 0 or C % BL:
        raise UsageError(f"{flags[1]} {BL} does not fit {flags[0]} {C}: the blocks must tile the completion (BL "
                         f"dividing C: {', '.join(str(b) for b in range(1, C + 1) if C % b == 0)})")
    if T <= 0 or T % (C // BL) or BL % (T // (C // BL)):
        raise UsageError(f"{flags[2]} {T} does not fit {flags[0]} {C} and {flags[1]} {BL}: each of the C/BL = "
                         f"{C // BL} blocks needs a whole number of steps revealing a whole number of its tokens "
                         f"(T: {', '.join(str(C // BL * d) for d in range(1, BL + 1) if BL % d == 0)})")

def validate(args):
    """Check every setting before anything runs; the first that cannot work raises UsageError naming the fix."""
    bounds = [  # fields, test, what they must be
        (("prompts_per_step", "micro_batch_size", "mc_samples", "num_iterations", "eval_batch_size",
          "keep_checkpoints", "max_steps"), lambda v: v >= 1, "at least 1"),
        (("mask_token_id", "eos_token_id", "train_examples", "eval_examples", "lora_rank", "top_k", "eval_top_k",
          "eval_every", "save_every", "learning_rate", "weight_decay", "beta", "eval_temperature",
          "toy_warmup_steps"), lambda v: v >= 0, "0 or more"),
        (("lora_alpha", "max_grad_norm", "num_train_epochs", "epsilon"), lambda v: v > 0, "more than 0"),
        (("temperature",), lambda v: v > 0, "more than 0 (greedy decoding, 0, is for --eval-temperature)"),
        (("adam_beta1", "adam_beta2", "warmup_ratio", "lora_dropout", "p_mask_prompt"), lambda v: 0 <= v < 1,
         "in [0, 1)"),
        (("top_p", "eval_top_p"), lambda v: 0 < v <= 1, "in (0, 1]"),
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
    require(args.update_schedule == "paper" or args.prompts_per_step * args.group_size // args.micro_batch_size
            % 2 == 0, "--update-schedule released needs an even number of micro-batches a step (the authors' "
            "run: 8 processes x 2); change --prompts-per-step or --micro-batch-size")
    require(not (args.eval_only and args.export), "--eval-only and --export are two commands: run one, then the other")
    for name in ("output_dir", "export"):
        path = getattr(args, name)
        require(path is None or not os.path.isfile(path), f"{flag(name)} {path} is a file; give a directory")
    require(args.export is None or not os.path.isdir(args.export) or not os.listdir(args.export),
            f"--export {args.export} is not empty; give a new directory (nothing is overwritten)")

def check_batch(args, world_size):
    """Whole prompt groups on every process, and micro-batches that split each process's completions."""
    require(args.prompts_per_step % world_size == 0 and args.prompts_per_step // world_size * args.group_size %
            args.micro_batch_size == 0, f"{world_size} process(es) need --prompts-per-step divisible by "
            f"{world_size} and --micro-batch-size dividing each process's prompts x --group-size; e.g. "
            f"--prompts-per-step {math.ceil(args.prompts_per_step / world_size) * world_size} --micro-batch-size "
            f"{args.group_size}")

def setup(args):
    """Everything that can fail for reasons outside the code, each failure one clear sentence (UsageError)."""
    require(not args.device.startswith("cuda") or torch.cuda.is_available(), "CUDA is not available here. "
            "LLaDA-8B needs a GPU (see README); for an offline CPU run use --model toy --device cpu")
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun: one process per GPU
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    check_batch(args, world()[1])
    if args.model == "toy":  # a fixed thread count gives the same numbers on every machine, whatever OMP_NUM_THREADS
        torch.set_num_threads(max(1, TOY_THREADS // world()[1]))
    try:
        train_examples = [] if args.eval_only or args.export else reward.load_examples(
            args.task, "train", args.data, n=args.train_examples or None, seed=args.seed)
        test_examples = reward.load_examples(args.task, "test", args.data, n=args.eval_examples or None,
                                             gsm8k_test=args.gsm8k_test) if args.eval_every or args.eval_only else []
    except reward.DataUnavailable as e:
        raise UsageError(str(e)) from None
    require(train_examples or args.eval_only or args.export, f"no training examples for {args.task}")
    # a checkpoint without adapters holds every weight: the toy's warm-up would be overwritten
    model, tokenizer = load_model_and_tokenizer(args, warm_up=not (is_checkpoint(args.resume) and not args.lora_rank))
    if args.activation_checkpointing:  # recompute activations in the backward pass: less memory, ~1/3 more time
        if hasattr(getattr(model, "model", None), "set_activation_checkpointing"):  # LLaDA's remote code
            model.model.set_activation_checkpointing("whole_layer")
        else:
            require(model.supports_gradient_checkpointing, "this model has no activation checkpointing")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, train_examples, test_examples

def main(argv=None):
    """Train (or evaluate, or export) as the flags say. A usage error ends with one sentence, not a traceback (any
    other exception keeps its traceback); in training, Ctrl-C and SIGTERM save and print how to resume."""
    try:
        args = parse_args(argv)
        model, tokenizer, train_examples, test_examples = setup(args)
        step = 0
        if (args.export or args.eval_only) and is_checkpoint(args.resume):  # training loads its own
            step = load_checkpoint(args.resume, model, args)[0]
        if args.export:
            source = f"{args.resume} (step {step})" if is_checkpoint(args.resume) else args.model
            return export(model, tokenizer, args.export, source) if world()[0] == 0 else None
        if not (args.eval_only and args.resume):  # evaluating a run only adds files to it
            run = [open_run(args) if world()[0] == 0 else None]
            if world()[1] > 1:  # every process writes into the first one's run directory
                dist.broadcast_object_list(run, src=0)
            args.output_dir = run[0]
        if args.eval_only:  # (each evaluation file is written whole, at its end)
            return evaluate(model, tokenizer, test_examples, args, step, f"eval-only-{time.strftime('%Y%m%d-%H%M%S')}")
        with stop_on_signals():
            train(model, tokenizer, train_examples, test_examples, args)
    except UsageError as e:
        raise SystemExit(f"agrpo: {e}") from None
    except OSError as e:  # a full disk, a read-only or missing directory: what could not be done to which file
        if not e.filename:
            raise
        raise SystemExit(f"agrpo: cannot write {e.filename}: {(e.strerror or str(e)).lower()}; nothing saved "
                         "before is lost") from None
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing half-written is left
        print("agrpo: stopped by SIGINT", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        for f in RUN_LOCKS:
            f.close()
        RUN_LOCKS.clear()
        if dist.is_initialized():
            dist.barrier()  # let rank 0 finish writing before any process leaves
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
