"""AGRPO, after "Simple Policy Gradients for Reasoning with Diffusion Language Models" (A. Zhan, arXiv 2510.04019).

The method first: 1 config, 2 LoRA, the helpers the method calls, 3 the sampler (generation as a Markov decision
process over denoising steps), 4 rewards and group advantages, 5 the policy gradients (AGRPO's Monte Carlo estimator
beside diffu-GRPO's biased mean-field one), 6 evaluation, 7 training (the step and the loop, which call the rest).
Then the plumbing, none of it AGRPO. `python agrpo.py --task countdown --model toy --device cpu` runs it on a CPU.
"""
import argparse
import contextlib
import dataclasses
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


class UsageError(Exception):
    """A setting, file or environment that cannot work: main() prints its one sentence, without a traceback."""

def require(ok, message):
    if not ok:
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------------------
# 1. Config: every hyperparameter, the authors' settings as defaults
def arg(default, help):
    """A field of Args: its default and its --help text (the command line is built from Args)."""
    return field(default=default, metadata={"help": help})

@dataclass
class Args:
    task: Literal["countdown", "gsm8k", "math500", "sudoku"] = arg("countdown", "Task to train on (reward.py).")
    model: str = arg("GSAI-ML/LLaDA-8B-Instruct", "Hub id or path of a masked diffusion LM, or toy (a CPU run).")
    data: Literal["hub", "synthetic"] = arg("hub", "The paper's hub data sets, or seeded offline generators.")
    toy_warmup_steps: int = arg(2000, "Toy only, not AGRPO: supervised steps that give it a start (0: none).")
    gsm8k_test: Literal["platinum", "openai"] = arg("platinum", "GSM8K test set (platinum: the authors' choice).")
    device: str = arg("cuda", "Torch device: cuda, cuda:N or cpu.")
    dtype: Literal["bfloat16", "float32"] = arg("bfloat16", "Model weights' dtype.")
    mask_token_id: int = arg(126336, "Id of the mask token (LLaDA: 126336).")
    eos_token_id: Optional[int] = arg(None, "Id of EOS; default: the model config's.")
    train_examples: int = arg(0, "Train on the first N training examples only (0: all).")
    seed: int = arg(333, "Seed of every random draw.")
    lora_rank: int = arg(64, "LoRA rank r; 0 trains all weights.")
    lora_alpha: float = arg(64.0, "LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input.")
    lora_targets: str = arg("q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out", "Names of the linear layers "
                            "that get adapters, comma-separated.")
    learning_rate: float = arg(5e-6, "AdamW peak learning rate.")
    adam_beta1: float = arg(0.9, "AdamW beta1.")
    adam_beta2: float = arg(0.99, "AdamW beta2.")
    weight_decay: float = arg(0.01, "AdamW weight decay.")
    max_grad_norm: float = arg(1.0, "Gradient-norm clip.")
    warmup_ratio: float = arg(0.01, "Share of the schedule warmed up linearly before the cosine decay.")
    num_train_epochs: float = arg(5.0, "Passes over the training prompts (unless --max-steps sets the length).")
    max_steps: Optional[int] = arg(None, "Training steps; default: as many as --num-train-epochs takes.")
    prompts_per_step: int = arg(16, "Prompts per training step, over all processes (the authors: 16).")
    micro_batch_size: int = arg(8, "Completions per forward pass on one process (gradients accumulate).")
    update_schedule: Literal["paper", "released"] = arg("paper", "'paper': one optimizer update per gradient step; "
        "'released': as the authors' trainer ran, an update after each sampled step of every second micro-batch.")
    group_size: int = arg(8, "Completions per prompt, G.")
    completion_length: int = arg(384, "Completion length C.")
    block_length: int = arg(12, "Semi-autoregressive block length BL.")
    sampling_steps: int = arg(128, "Denoising steps T; each reveals C/T tokens.")
    unmasking: Literal["random", "low_confidence"] = arg("random", "Which masked positions a step reveals. AGRPO "
        "needs random (then they do not depend on the parameters); diffu-GRPO may use low_confidence, as d1 does.")
    temperature: float = arg(0.6, "Sampling temperature (> 0 for training).")
    top_p: float = arg(0.99, "Nucleus truncation of the support (1 = off).")
    top_k: int = arg(150, "Top-k truncation of the support (0 = off).")
    estimator: Literal["agrpo", "diffu-grpo"] = arg("agrpo", "The policy gradient: AGRPO's unbiased Monte Carlo "
        "estimator, or the baseline, d1's diffu-GRPO (one-step mean-field log-probs, biased).")
    mc_samples: int = arg(24, "AGRPO: sampled timesteps M per completion.")
    importance_sampling: Literal["entropy", "uniform"] = arg("entropy", "AGRPO: distribution q over timesteps.")
    low_discrepancy: bool = arg(True, "AGRPO: stratify the batch's uniforms before the inverse CDF of q.")
    p_mask_prompt: float = arg(0.15, "diffu-GRPO: probability of masking each prompt token (d1's runs: 0.15).")
    epsilon: float = arg(0.2, "PPO clip range eps.")
    beta: float = arg(0.0, "Weight of the k3 KL to the reference (adapters off; needs --lora-rank > 0).")
    num_iterations: int = arg(1, "Gradient steps per batch of rollouts (diffu-GRPO's mu; d1: 12).")
    scale_rewards: Literal["none", "std"] = arg("none", "'std' divides advantages by the group std (GRPO's).")
    activation_checkpointing: bool = arg(False, "Recompute activations in the backward pass (saves memory).")
    eval_every: int = arg(0, "Evaluate every N steps, at the start and at the end (0: never).")
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
    output_dir: Optional[str] = arg(None, "A new run's directory; default: runs/<task>-<date>-<time>.")
    save_every: int = arg(15, "Save a checkpoint every N steps (and at the end; 0: only at the end).")
    keep_checkpoints: int = arg(3, "Keep the newest N checkpoints.")
    resume: Optional[str] = arg(None, "Continue a run (a checkpoint, a run's newest, or latest: the newest run's).")


# ----------------------------------------------------------------------------------------------------------
# 2. LoRA on LLaDA-8B-Instruct, written plainly (the model itself is loaded by from_pretrained, in the plumbing)
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


# ----------------------------------------------------------------------------------------------------------
# What the method calls, named for what it does: processes, prompts, random streams, the attention mask, logits
def world():
    """(rank, number of processes); torchrun starts one process per GPU."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def synchronize(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()

def tokenize_prompts(tokenizer, examples, args):
    """The chat prompts' ids, left-padded, and their attention mask (1 on real tokens)."""
    texts = [tokenizer.apply_chat_template(reward.prompt_messages(args.task, ex), add_generation_prompt=True,
                                           tokenize=False) for ex in examples]
    enc = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    return enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)

def seed_of(args, purpose, *index):
    """The seed of one random stream, named by its purpose ("rollout", "timesteps", "prompt mask", "dropout",
    "evaluation") and index (step, global micro-batch, ...): so 1 or N processes and a resumed run draw alike."""
    return random.Random(str((args.seed, purpose, *index))).getrandbits(63)

def stream(args, purpose, *index):
    return torch.Generator(args.device).manual_seed(seed_of(args, purpose, *index))

def attention_mask(prompt_attention, C, rows=slice(None)):
    """The attention mask of prompt + completion, or None when no prompt is padded: LLaDA turns any mask into
    an additive bias (ruling out fused attention kernels) and checks it on the host every forward."""
    if prompt_attention is None:
        return None
    prompt = prompt_attention[rows]
    return torch.cat([prompt, prompt.new_ones(prompt.shape[0], C)], 1)

def logits_at(model, input_ids, attention, positions):
    """Logits (B, n, V) at `positions` (B, n) only: the output layer is fed just those hidden states, so the
    full (B, length, V) logits are never built (for any model whose output layer is a module)."""
    head = model.get_output_embeddings()
    if head is None or isinstance(head, nn.Embedding):  # tied through F.linear: slice the full logits
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    def keep_positions(_, inputs):
        hidden = inputs[0]
        return (hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])),) + inputs[1:]
    handle = head.register_forward_pre_hook(keep_positions)
    try:
        return model(input_ids=input_ids, attention_mask=attention).logits
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------
# 3. Masked diffusion sampler: generation as a Markov decision process over denoising steps
@dataclass
class Rollout:
    """B completions of length C and, per completion token, what the policy gradient needs."""
    prompt_ids: torch.Tensor                  # (B, P) left-padded prompts
    prompt_attention: Optional[torch.Tensor]  # (B, P) 1 on real prompt tokens (None: no padding in the batch)
    tokens: torch.Tensor                      # (B, C) completion ids
    revealed_at: torch.Tensor                 # (B, C) the denoising step t that revealed the token; T: none (filler)
    positions: torch.Tensor                   # (B, T, k) the k completion positions revealed at each step
    logp: torch.Tensor                        # (B, C) log pi_old(token | s_t), truncated and tempered
    entropy: torch.Tensor                     # (B, C) entropy of that distribution
    support: Optional[torch.Tensor]           # (B, C, K) candidate ids, most probable first (None: no truncation)
    support_size: torch.Tensor                # (B, C) the support S_i is support[..., :support_size]

def truncated_logits(logits, args):
    """softmax(logits / temperature) restricted to S_i: top-k, then top-p on the renormalised top-k. Returns the
    candidates' tempered logits (-inf outside S_i), their ids (top-p alone: as many as the widest nucleus), |S_i|."""
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
        return Draw(tokens=tokens, logp=zeros, entropy=zeros, support=tokens[..., None],
                    support_size=torch.ones_like(tokens), confidence=confidence)
    z, ids, size = truncated_logits(logits, args)
    logq = z.log_softmax(-1)
    gumbel = -(-torch.rand(z.shape, dtype=torch.float64, device=z.device, generator=generator).log()).log()
    pick = (z.double() + gumbel).argmax(-1, keepdim=True)  # Gumbel-max: an exact draw from softmax(z)
    logp = logq.gather(-1, pick).squeeze(-1)
    return Draw(tokens=ids.gather(-1, pick).squeeze(-1), logp=logp, entropy=torch.special.entr(logq.exp()).sum(-1),
                support=ids, support_size=size, confidence=logp)

@torch.no_grad()
def generate(model, prompt_ids, prompt_attention, args, generator=None) -> Rollout:
    """Semi-autoregressive masked diffusion: C/BL blocks left to right, T denoising steps in all, each one
    forward pass that reveals k = C/T tokens of the current block; records what the policy gradient needs.
    Positions: j in the block, i = lo + j in the completion, P + i in the sequence."""
    B, P = prompt_ids.shape
    C, BL, T, dev = args.completion_length, args.block_length, args.sampling_steps, prompt_ids.device
    k = C // T  # tokens revealed a step
    steps_per_block = T // (C // BL)
    x = torch.cat([prompt_ids, torch.full((B, C), args.mask_token_id, device=dev)], 1)  # the state s_t
    prompt_attention = None if prompt_attention.all() else prompt_attention  # unpadded: no mask, fused kernels
    revealed_at = torch.full((B, C), T, device=dev)  # T: revealed by no step (yet)
    positions = torch.zeros(B, T, k, dtype=torch.long, device=dev)
    logp = torch.zeros(B, C, device=dev)
    entropy = torch.zeros(B, C, device=dev)
    V = model.get_input_embeddings().num_embeddings
    truncated = args.temperature > 0 and (args.top_p < 1 or 0 < args.top_k < V)
    support = torch.zeros(B, C, 0, dtype=torch.long, device=dev) if truncated else None  # widened as needed
    support_size = torch.ones(B, C, dtype=torch.long, device=dev)
    rows = torch.arange(B, device=dev)  # the rows still generating
    for t in range(T):
        if t % steps_per_block == 0:  # a new block, completion positions lo .. lo + BL - 1
            lo = t // steps_per_block * BL
            block = torch.arange(P + lo, P + lo + BL, device=dev).expand(len(rows), -1)  # in the sequence
            attention = attention_mask(prompt_attention, C, rows)
            r = rows[:, None]
        # 1. one forward pass on s_t; 2. a draw at every position of the block
        draw = sample_tokens(logits_at(model, x[rows], attention, block), args, generator)
        # 3. k positions still masked (a sampled mask id counts as revealed): the most confident, or random
        priority = draw.confidence if args.unmasking == "low_confidence" else \
            torch.rand(draw.confidence.shape, device=dev, generator=generator)
        j = priority.masked_fill(revealed_at[rows, lo:lo + BL] < T, -math.inf).topk(k, dim=-1).indices  # (R, k)
        i = lo + j
        # 4. reveal them, and record what the policy gradient needs
        x[r, P + i] = draw.tokens.gather(1, j)
        revealed_at[r, i] = t
        positions[rows, t] = i
        logp[r, i] = draw.logp.gather(1, j)
        entropy[r, i] = draw.entropy.gather(1, j)
        support_size[r, i] = draw.support_size.gather(1, j)
        if support is not None:
            K = draw.support.shape[-1]
            support = nn.functional.pad(support, (0, max(K - support.shape[-1], 0)))
            support[r, i, :K] = draw.support.gather(1, j[..., None].expand(-1, -1, K))
        if (t + 1) % steps_per_block == 0:  # 5. the block is complete: one all EOS ends its row
            ended = (x[rows, P + lo:P + lo + BL] == args.eos_token_id).all(-1)
            x[rows[ended], P + lo + BL:] = args.eos_token_id  # the rest is EOS filler, revealed by no step
            rows = rows[~ended]
            if len(rows) == 0:
                break
    return Rollout(prompt_ids=prompt_ids, prompt_attention=prompt_attention, tokens=x[:, P:],
                   revealed_at=revealed_at, positions=positions, logp=logp, entropy=entropy, support=support,
                   support_size=support_size)


# ----------------------------------------------------------------------------------------------------------
# 4. Rewards (reward.py) and group-relative advantages
def grade(tokenizer, completions, examples, args):
    """Decode completions and grade each (reward.py): the reward's "format" and "correct", the "score", the text."""
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

def revealed_logprobs(model, rollout, t, args):
    """log pi(x_i | s_t) of the k tokens each completion revealed at its step t (B,), under the recorded support and
    temperature, s_t rebuilt by re-masking every token revealed at step >= t (the EOS filler, at T, included).
    Returns log-probs and completion positions, both (B, k)."""
    pos = rollout.positions[torch.arange(len(t), device=t.device), t]
    state = rollout.tokens.masked_fill(rollout.revealed_at >= t[:, None], args.mask_token_id)
    ids = torch.cat([rollout.prompt_ids, state], 1)
    attention = attention_mask(rollout.prompt_attention, state.shape[1])
    z = logits_at(model, ids, attention, rollout.prompt_ids.shape[1] + pos).float() / args.temperature
    if rollout.support is None:
        norm = z.logsumexp(-1)
    else:
        K = rollout.support.shape[-1]
        candidates = z.gather(-1, rollout.support.gather(1, pos[..., None].expand(-1, -1, K)))
        outside = torch.arange(K, device=z.device) >= rollout.support_size.gather(1, pos)[..., None]
        norm = candidates.masked_fill(outside, -math.inf).logsumexp(-1)
    return z.gather(-1, rollout.tokens.gather(1, pos)[..., None]).squeeze(-1) - norm, pos

def clipped_surrogate(logp, old_logp, advantages, args):
    """The per-token PPO-clipped term -min(r A, clip(r, 1 - eps, 1 + eps) A), r = exp(logp - logp_old); and r."""
    ratio = (logp - old_logp).exp()
    return -torch.min(ratio * advantages, ratio.clamp(1 - args.epsilon, 1 + args.epsilon) * advantages), ratio

def k3(ref_logp, logp):
    """The k3 estimate of KL(pi || ref) at a token drawn from pi."""
    return (ref_logp - logp).exp() - (ref_logp - logp) - 1

def agrpo_losses(model, rollout, advantages, args, generator=None):
    """AGRPO's loss on a micro-batch as M losses, one per sampled step t, each back-propagated at once (memory stays
    flat in M): the PPO-clipped log-probs of the tokens revealed at t (plus beta k3 to the reference), weighted by
    1 / (L q(t)), estimate a completion's step average (1/L) sum_t. Yields (loss, (r, A, k3))."""
    t, weight = sample_timesteps(rollout, trajectory_length(rollout, args), args, generator)
    for m in range(args.mc_samples):
        logp, pos = revealed_logprobs(model, rollout, t[:, m], args)
        adv = advantages[:, None].expand_as(logp)
        term, ratio = clipped_surrogate(logp, rollout.logp.gather(1, pos), adv, args)
        kl = None
        if args.beta > 0:
            with torch.no_grad(), adapters_off(model):
                ref = revealed_logprobs(model, rollout, t[:, m], args)[0]
            kl = k3(ref, logp)
            term = term + args.beta * kl * ratio  # times r: tokens drawn from pi_old, E_old[r grad k3] = grad KL
        # the loss normalisation: the step's mean over prompts of each group's mean over G completions and M steps
        loss = (term * weight[:, m, None]).sum() / (args.mc_samples * args.group_size) / args.prompts_per_step
        yield loss, (ratio.detach(), adv, None if kl is None else kl.detach())

# diffu-GRPO (d1, Zhao et al. 2025), the baseline the paper argues against, as d1's code computes it.
def mask_prompt(prompt_ids, args, generator):
    """diffu-GRPO's input noise: each prompt token (padding too) masked with probability p_mask_prompt."""
    noise = torch.rand(prompt_ids.shape, device=prompt_ids.device, generator=generator)
    return prompt_ids.masked_fill(noise < args.p_mask_prompt, args.mask_token_id)

def mean_field_logprobs(model, rollout, masked_prompt, args):
    """diffu-GRPO's log pi(x_i) at every completion position: log-softmax of the raw logits (temperature 1, no
    truncation) of one forward pass on the masked prompt and an all-mask completion, under the sampler's attention
    mask (d1 never pads). Biased: it ignores the order of unmasking and the states each token was drawn in."""
    P, C = masked_prompt.shape[1], rollout.tokens.shape[1]
    ids = torch.cat([masked_prompt, torch.full_like(rollout.tokens, args.mask_token_id)], 1)
    positions = torch.arange(P, P + C, device=ids.device).expand(len(ids), -1)
    z = logits_at(model, ids, attention_mask(rollout.prompt_attention, C), positions).float()
    return z.gather(-1, rollout.tokens[..., None]).squeeze(-1) - z.logsumexp(-1)

def token_shares(tokens, args):
    """diffu-GRPO's token mean: the tokens up to and including a completion's first EOS count, each 1 / (the
    tokens its group of G counts); later tokens 0. `tokens` holds whole groups."""
    eos = (tokens == args.eos_token_id).long()
    counted = (eos.cumsum(1) - eos == 0).float()
    per_group = counted.view(-1, args.group_size * tokens.shape[1]).sum(1)
    return counted / per_group.repeat_interleave(args.group_size)[:, None]

def diffu_grpo_losses(model, rollout, advantages, masked_prompt, old_logp, share, args):
    """diffu-GRPO's loss on a micro-batch (one backward pass): the PPO-clipped mean-field log-probs, r against the
    same estimate under the weights that drew the batch (old_logp; None: r = 1), plus beta k3 without the ratio, as
    d1 adds it; a mean over each group's counted tokens (share), over the step's prompts. Yields (loss, (r, A, k3))."""
    logp = mean_field_logprobs(model, rollout, masked_prompt, args)
    adv = advantages[:, None].expand_as(logp)
    term, ratio = clipped_surrogate(logp, logp.detach() if old_logp is None else old_logp, adv, args)
    kl = None
    if args.beta > 0:
        with torch.no_grad(), adapters_off(model):
            ref = mean_field_logprobs(model, rollout, masked_prompt, args)
        kl = k3(ref, logp)
        term = term + args.beta * kl
    counted = share > 0
    yield (term * share).sum() / args.prompts_per_step, (ratio[counted].detach(), adv[counted],
                                                         None if kl is None else kl[counted].detach())


# ----------------------------------------------------------------------------------------------------------
# 6. Evaluation (the authors': C=256, BL=32, T=128, low_confidence, greedy)
@torch.no_grad()
def evaluate(model, tokenizer, examples, args, step, name="eval"):
    """Decode the test prompts with the evaluation settings at each T of --eval-sampling-steps and grade them. Each
    process takes every world_size-th example; rank 0 writes <run>/<name>-step<step>-T<T>.jsonl, a line per example
    in the test set's order with the reference and the answer the grader read, so that a score can be audited."""
    rank, world_size = world()
    model.eval()
    mine, metrics = examples[rank::world_size], {}
    prompt_lengths = tokenize_prompts(tokenizer, mine, args)[1].sum(1).tolist()  # batches of prompts of one length,
    order = sorted(range(len(mine)), key=lambda j: prompt_lengths[j])  # so that few need an attention mask
    for T in map(int, args.eval_sampling_steps.split(",")):
        eval_args = dataclasses.replace(args, completion_length=args.eval_completion_length, sampling_steps=T,
                                        block_length=args.eval_block_length, unmasking=args.eval_unmasking,
                                        temperature=args.eval_temperature, top_p=args.eval_top_p, top_k=args.eval_top_k)
        records, seconds = [], 0.0
        for b in tqdm(range(0, len(mine), args.eval_batch_size), desc=f"eval T={T}", disable=rank > 0, leave=False):
            index = order[b:b + args.eval_batch_size]
            chunk, clock = [mine[j] for j in index], time.perf_counter()
            rollout = generate(model, *tokenize_prompts(tokenizer, chunk, args), eval_args,
                               stream(args, "evaluation", T, rank, b))
            synchronize(args)
            seconds += time.perf_counter() - clock
            graded = grade(tokenizer, rollout.tokens, chunk, args)
            lengths = (rollout.tokens != args.eos_token_id).sum(1).tolist()
            records += [dict(index=rank + world_size * j, question=ex["question"], reference=reward.reference(
                             args.task, ex), answer=g["answer"], score=g["score"], length=length, completion=g["text"])
                        for j, ex, g, length in zip(index, chunk, graded, lengths)]
        records, seconds = gather_records(records, seconds)
        path = os.path.join(args.output_dir, f"{name}-step{step}-T{T}.jsonl")
        if rank == 0:
            write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
        n = max(len(records), 1)
        metrics.update({f"eval_T{T}_accuracy": sum(r["score"] for r in records) / n,
                        f"eval_T{T}_completion_length": sum(r["length"] for r in records) / n,
                        f"eval_T{T}_seconds_per_completion": seconds / n})
        say(f"step {step}: evaluation accuracy {metrics[f'eval_T{T}_accuracy']:.1%} at T={T} on {len(examples)} "
            f"problems ({path})")
    return metrics


# ----------------------------------------------------------------------------------------------------------
# 7. Training: the step and the loop, on one GPU or many (torchrun)
def update(trainable, optimizer, grad_norms, args):
    """One optimizer update. DDP by hand: the gradients summed over processes (each loss is already divided by all
    the step's prompts, so the sum is the step's mean), then clipped."""
    for p in trainable if world()[1] > 1 else []:  # (every backward pass reaches every trainable weight)
        dist.all_reduce(p.grad)
    grad_norms.append(nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def rl_step(model, tokenizer, optimizer, schedule, prompts, args, step):
    """One step on this process's share of the prompt groups: G rollouts per prompt, rewards, group advantages,
    then num_iterations gradient steps of the estimator, each one optimizer update. Returns what happened."""
    rank, world_size = world()
    mine = prompts[rank * len(prompts) // world_size:(rank + 1) * len(prompts) // world_size]
    examples = [ex for ex in mine for _ in range(args.group_size)]
    mb = args.micro_batch_size
    n = len(examples) // mb  # this process's micro-batches,
    first = rank * n  # and the global index of its first
    seconds, clock = {}, time.perf_counter()
    model.eval()
    rollouts = [generate(model, *tokenize_prompts(tokenizer, examples[j * mb:(j + 1) * mb], args), args,
                         stream(args, "rollout", step, first + j)) for j in range(n)]
    synchronize(args)
    seconds["generate"], clock = time.perf_counter() - clock, time.perf_counter()
    tokens = torch.cat([r.tokens for r in rollouts])
    graded = grade(tokenizer, tokens, examples, args)
    rewards = torch.tensor([g["format"] + g["correct"] for g in graded])
    advantages = group_advantages(rewards, args.group_size, args.scale_rewards).to(args.device)
    seconds["grade"], clock = time.perf_counter() - clock, time.perf_counter()
    model.train()
    if args.estimator == "agrpo":
        def losses(j, iteration):  # micro-batch j's M losses
            return agrpo_losses(model, rollouts[j], advantages[j * mb:(j + 1) * mb], args,
                                stream(args, "timesteps", step, iteration, first + j))
    else:
        share = token_shares(tokens, args)
        masked = {(j, i): mask_prompt(rollouts[j].prompt_ids, args, stream(args, "prompt mask", step, i, first + j))
                  for i in range(args.num_iterations) for j in range(n)}
        with torch.no_grad():  # the estimate under the weights that drew the batch, each iteration's mask
            old = {} if args.num_iterations == 1 else \
                {(j, i): mean_field_logprobs(model, rollouts[j], m, args) for (j, i), m in masked.items()}
        def losses(j, iteration):  # micro-batch j's one loss
            return diffu_grpo_losses(model, rollouts[j], advantages[j * mb:(j + 1) * mb], masked[j, iteration],
                                     old.get((j, iteration)), share[j * mb:(j + 1) * mb], args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    stats, grad_norms = [], []
    for iteration in range(args.num_iterations):
        stats.clear()  # the last iteration's are the ones reported
        if args.update_schedule == "released":
            released_updates(losses, n, first, iteration, trainable, optimizer, stats, grad_norms, args)
        else:
            for j in range(n):
                for loss, per_token in losses(j, iteration):
                    loss.backward()
                    stats.append((loss.detach(), per_token))
            update(trainable, optimizer, grad_norms, args)
        schedule.step()  # once per iteration in both schedules: the released one's updates share one rate
    synchronize(args)
    seconds["train"] = time.perf_counter() - clock
    return dict(rewards=rewards, graded=graded, advantages=advantages, tokens=tokens, stats=stats,
                grad_norms=grad_norms, seconds=seconds)

def released_updates(losses, n, first, iteration, trainable, optimizer, stats, grad_norms, args):
    """The authors' released trainer (README), as its 8 processes x 2 micro-batches ran, on any number here: the
    even micro-batches (global index) accumulate; then each sampled step of the odd ones gets its own update."""
    odd = [j for j in range(n) if (first + j) % 2]
    for j in range(n):
        for loss, per_token in losses(j, iteration) if j not in odd else []:
            loss.backward()
            stats.append((loss.detach(), per_token))
    pending = [losses(j, iteration) for j in odd]
    for _ in range(args.mc_samples if args.estimator == "agrpo" else 1):
        for micro_batch in pending:
            loss, per_token = next(micro_batch)
            loss.backward()
            stats.append((loss.detach(), per_token))
        update(trainable, optimizer, grad_norms, args)

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
    state = load_checkpoint(args.resume, model, args, optimizer, schedule) if args.resume else {}
    done, prompts_seen, elapsed = state.get("step", 0), state.get("prompts_seen", 0), state.get("elapsed", 0.0)
    log = metrics_log(args.output_dir, done)
    say(f"{args.estimator} on {args.task}: steps {done + 1}..{total_steps} of {args.prompts_per_step} prompts x "
        f"{args.group_size} completions, {world_size} process(es); run directory {args.output_dir}")
    started, saved = time.time() - elapsed, done
    if args.eval_every and done == 0:  # the starting point of the curve
        log(0, evaluate(model, tokenizer, test_examples, args, 0))
    bar = tqdm(range(done + 1, total_steps + 1), desc=args.estimator, dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        if stop_requested(args):  # Ctrl-C or SIGTERM came: stop between steps, and save
            bar.close()
            if saved < done:
                save_checkpoint(model, optimizer, schedule, done, prompts_seen, time.time() - started, args)
            stopped(done, total_steps, saved < done, args)
        torch.manual_seed(seed_of(args, "dropout", step, rank))  # LoRA dropout
        batch = prompts_at(train_examples, args.seed, prompts_seen, args.prompts_per_step)
        metrics = step_metrics(schedule, args, **rl_step(model, tokenizer, optimizer, schedule, batch, args, step))
        done, prompts_seen = step, prompts_seen + args.prompts_per_step
        log(step, {**metrics, "prompts_seen": prompts_seen, "elapsed_seconds": time.time() - started})
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                        gen=f"{metrics['seconds_generate']:.1f}s", train=f"{metrics['seconds_train']:.1f}s")
        if args.eval_every and (step % args.eval_every == 0 or step == total_steps):
            log(step, evaluate(model, tokenizer, test_examples, args, step))
        if step == total_steps or (args.save_every and step % args.save_every == 0):
            saved = save_checkpoint(model, optimizer, schedule, step, prompts_seen, time.time() - started, args)
    bar.close()
    if rank == 0:
        plot_curves(args.output_dir)
        say(f"Done in {(time.time() - started) / 60:.1f} min; curves: {args.output_dir}/curves.svg")

# ==========================================================================================================
# Plumbing, not AGRPO: metrics and curves, loading and the toy model, runs and signals, the command line

# ----------------------------------------------------------------------------------------------------------
# Metrics over all processes, and the curves
def say(message):
    if os.environ.get("RANK", "0") == "0":  # the first process only (also before torch.distributed starts)
        tqdm.write(message)

def over_ranks(metrics, args, how):
    """The metrics as plain floats, their mean or their max over processes (one process: no tensor, no sync)."""
    values = [float(v) for v in metrics.values()]
    if world()[1] > 1:
        reduced = torch.tensor(values, dtype=torch.float64, device=args.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
        values = (reduced / world()[1] if how == "mean" else reduced).tolist()
    return dict(zip(metrics, values))

def step_metrics(schedule, args, rewards, graded, advantages, tokens, stats, grad_norms, seconds):
    """A training step's metrics (README: "Metrics and curves"), over all processes."""
    spread = rewards.view(-1, args.group_size).std(1)
    mean = lambda key: sum(g[key] for g in graded) / len(graded)
    clip = lambda r, a, side: ((side * (r - 1) > args.epsilon) & (side * a > 0)).float().mean()  # no gradient there
    loss, clip_low, clip_high, kl, ratio_max_dev = torch.stack([torch.stack([loss, clip(r, a, -1), clip(r, a, 1),
        r.new_zeros(()) if kl is None else kl.mean(), (r - 1).abs().max()]) for loss, (r, a, kl) in stats]).T
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
    completion_tokens = args.prompts_per_step * args.group_size * args.completion_length  # all processes'
    return {**metrics, **over_ranks(peaks, args, "max"),
            "tokens_per_second": completion_tokens / sum(metrics[f"seconds_{k}"] for k in seconds)}

def gather_records(records, seconds):
    """Every process's evaluation records, in the test set's order, and the seconds they took, summed."""
    if world()[1] > 1:
        gathered = [None] * world()[1]
        dist.all_gather_object(gathered, (records, seconds))
        records, seconds = [r for part, _ in gathered for r in part], sum(s for _, s in gathered)
    return sorted(records, key=lambda record: record["index"]), seconds

def read_metrics(path):
    """The metric lines of a run, without a last one that a crash cut short."""
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]

def plot_curves(run):
    """run/curves.svg, which a browser opens: reward, training and evaluation accuracy, completion length by step."""
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    evals = sorted({k for r in rows for k in r if k.startswith("eval_T") and k.endswith("_accuracy")})
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="760" height="440" font-family="sans-serif" font-size="11">']
    for n, keys in enumerate([["reward"], ["accuracy"], evals, ["completion_length"]]):  # a panel of 340 x 160 each
        x0, y0 = n % 2 * 380 + 20, n // 2 * 220 + 30
        series = [[(r["step"], r[k]) for r in rows if k in r] for k in keys]
        (s0, s1), (v0, v1) = [(min(c), max(c)) for c in zip(*(sum(series, []) or [(0, 0)]))]
        svg.append(f'<text x="{x0}" y="{y0 - 8}">{", ".join(keys)}: {v0:.3g} to {v1:.3g}, steps {s0} to {s1}</text>')
        X = lambda s: x0 + 340 * (s - s0) / ((s1 - s0) or 1)
        Y = lambda v: y0 + 160 - 160 * (v - v0) / ((v1 - v0) or 1)
        for color, points in zip(("blue", "red", "green", "purple"), series):
            xy = " ".join(f"{X(s):.1f},{Y(v):.1f}" for s, v in points)
            svg.append(f'<polyline fill="none" stroke="{color}" points="{xy}"/>')
    write_atomically(os.path.join(run, "curves.svg"), "\n".join(svg + ["</svg>\n"]))


# ----------------------------------------------------------------------------------------------------------
# Loading: LLaDA-8B-Instruct, the toy model and its supervised warm-up
def from_pretrained(args):
    """LLaDA-8B-Instruct (its remote code maps AutoModel to the LM) or another masked LM, and its tokenizer; one
    sentence when it cannot be loaded, at once when the hub cannot be reached."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    name = args.model
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.path.isdir(name)  # a path, not a hub id
    require(not local or os.path.isfile(os.path.join(name, "config.json")), f"--model {name}: no model directory there")
    try:
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=True, local_files_only=True)
        except OSError:  # not on this machine: ask the hub once, before transformers retries for a minute
            import huggingface_hub
            try:
                huggingface_hub.model_info(name, timeout=10)
            except Exception as e:  # an answer (a 404, say) means the hub is reachable: transformers says the rest
                require(getattr(e, "response", None) is not None, f"--model {name} is not on this machine and the hub "
                        f"cannot be reached ({type(e).__name__}); download it where there is a network "
                        "(HF_HUB_OFFLINE=1 then uses the cached copy), or use --model toy for an offline run")
            config = AutoConfig.from_pretrained(name, trust_remote_code=True)
        auto = AutoModel if "AutoModel" in (getattr(config, "auto_map", None) or {}) else AutoModelForMaskedLM
        model = auto.from_pretrained(name, trust_remote_code=True, dtype=getattr(torch, args.dtype))
        return model, AutoTokenizer.from_pretrained(name, trust_remote_code=True, padding_side="left")
    except (OSError, ImportError, ValueError) as e:
        raise UsageError(f"could not load --model {name} ({str(e).strip().splitlines()[0][:200]}); check the "
                         "name, the network or HF_HOME, or use --model toy for an offline run") from None

# The toy's defaults, then its task's (a typed flag still wins): a CPU run of minutes that evaluates the policy it
# trains (sampled at the training temperature, random unmasking); greedy decoding of the toy barely moves.
TOY = dict(data="synthetic", device="cpu", dtype="float32", mask_token_id=2, lora_rank=0,
           lora_targets="query,key,value,dense", learning_rate=6e-4, max_steps=150, prompts_per_step=8,
           group_size=8, micro_batch_size=32, completion_length=24, block_length=8, sampling_steps=12,
           mc_samples=4, top_k=0, top_p=1.0, temperature=1.0, eval_every=150, eval_completion_length=24,
           eval_block_length=8, eval_sampling_steps="12", eval_unmasking="random", eval_temperature=1.0,
           eval_batch_size=64)
TOY_TASKS = {"countdown": {}, "sudoku": dict(toy_warmup_steps=500, max_steps=1000, eval_every=1000)}
TOY_THREADS = 2  # the toy's threads, shared by its processes: the 2 cores of the machine this project is built on

def toy_model_and_tokenizer(seed: int):
    """A tiny random bidirectional masked LM (BERT-shaped) and a character tokenizer (numbers of up to three digits and
    the answer tags whole tokens); its chat template drops the system prompt, too much for a model this small."""
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
    # 8 heads and weights wider than BERT's 0.02: the warm-up learns to copy numbers for every seed tried
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
    """A supervised start that earns the random toy some reward to learn from: LLaDA's pre-training objective, masked
    diffusion, on solved synthetic problems (README); cached on disk, keyed by what determines the weights."""
    C, updates = args.completion_length, args.toy_warmup_steps
    key = hashlib.sha256(repr((args.task, args.seed, updates, C, args.mask_token_id, args.eos_token_id, batch, lr,
        torch.__version__, torch.get_num_threads(), [open(f).read() for f in (__file__, reward.__file__)])).encode())
    path = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "agrpo",
                        f"toy-{args.task}-{key.hexdigest()[:16]}.pt")
    if os.path.exists(path):
        return model.load_state_dict(torch.load(path, weights_only=True))
    n = min(updates * batch, reward.SYNTHETIC_TRAIN_SIZE)
    examples = reward.load_examples(args.task, "train", "synthetic", n=n, seed=args.seed)
    answers = tokenizer([toy_answer(args.task, ex) for ex in examples], add_special_tokens=False)["input_ids"]
    answers = torch.tensor([(ids + [args.eos_token_id] * C)[:C] for ids in answers])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1 - update / updates)
    generator = torch.Generator().manual_seed(args.seed)
    positions = torch.arange(C).expand(batch, -1)
    for _ in tqdm(range(updates), desc="toy warm-up (not AGRPO)", disable=world()[0] > 0, leave=False):
        rows = torch.randint(len(examples), (batch,), generator=generator)
        prompt, prompt_attention = (v.cpu() for v in tokenize_prompts(tokenizer, [examples[i] for i in rows], args))
        x0 = answers[rows]
        share = ((torch.randperm(batch, generator=generator) + torch.rand(batch, generator=generator)) / batch)
        share = share.clamp_min(1e-3)[:, None]  # of the tokens masked, stratified over the batch
        masked = torch.rand(x0.shape, generator=generator) < share
        x = torch.cat([prompt, x0.masked_fill(masked, args.mask_token_id)], 1)
        logits = logits_at(model, x, attention_mask(prompt_attention, C), prompt.shape[1] + positions)
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none") * masked / share
        (loss.sum() / x0.numel()).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(model.state_dict(), f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)  # a reader never sees half a file


# ----------------------------------------------------------------------------------------------------------
# Runs and checkpoints (a directory a run, atomic saves, exact resume), the data stream, Ctrl-C and SIGTERM
def write_atomically(path, text):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)  # a reader never sees half a file

def checkpoints(run):
    """The run's checkpoint directories, oldest first."""
    names = [d for d in os.listdir(run) if re.fullmatch(r"checkpoint-\d+", d)] if os.path.isdir(run) else []
    return [os.path.join(run, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]

def find_resume(resume):
    """The checkpoint --resume names: itself, or the newest of RUN, or of latest (the run under runs/ written last)."""
    if resume == "latest":
        runs = [e.path for e in os.scandir("runs") if e.is_dir()] if os.path.isdir("runs") else []
        require(runs, "there is no run under runs/ to resume; give its directory, or drop --resume")
        resume = max(runs, key=lambda run: max((e.stat().st_mtime for e in os.scandir(run)), default=0))
    found = [resume] if os.path.isfile(os.path.join(resume, "state.pt")) else checkpoints(resume)
    require(found, f"--resume {resume}: no checkpoint there; give a run or checkpoint directory, or start again")
    return found[-1]

def open_run(args):
    """This command's run directory, the resolved settings in its config.json: a resumed run's own, or a new one
    (--output-dir, or runs/<task>-<date>-<time>)."""
    if not args.resume:
        args.output_dir = args.output_dir or os.path.join("runs", f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        require(not os.path.exists(os.path.join(args.output_dir, "config.json")), f"{args.output_dir} already holds "
                f"a run: continue it with --resume {args.output_dir}, or choose another --output-dir")
        os.makedirs(args.output_dir, exist_ok=True)
    write_atomically(os.path.join(args.output_dir, "config.json"), json.dumps(dataclasses.asdict(args), indent=1))
    return args.output_dir

def save_checkpoint(model, optimizer, schedule, step, prompts_seen, elapsed, args):
    """<run>/checkpoint-<step> (first process only): what training needs to go on exactly, written to a temporary
    directory and renamed, so a crash or a full disk never leaves half a checkpoint; keeps the newest. Returns step."""
    if world()[0] == 0:
        tmp = os.path.join(args.output_dir, f".tmp-checkpoint-{step}")
        try:
            os.makedirs(tmp, exist_ok=True)
            torch.save({"model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                        "prompts_seen": prompts_seen, "elapsed": elapsed}, os.path.join(tmp, "state.pt"))
            write_atomically(os.path.join(tmp, "args.json"), json.dumps(dataclasses.asdict(args), indent=1))
            os.replace(tmp, os.path.join(args.output_dir, f"checkpoint-{step}"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in checkpoints(args.output_dir)[:-args.keep_checkpoints]:
            shutil.rmtree(old)
    return step

def load_checkpoint(path, model, args, optimizer=None, schedule=None):
    """Restore a checkpoint's weights and, to train on, the optimizer and the schedule (re-sized if the run was made
    longer or shorter); only the run's newest, as going on from an older one would overwrite its successors."""
    require(optimizer is None or os.path.samefile(path, checkpoints(args.output_dir)[-1]), f"{path} is not the newest "
            f"checkpoint of {args.output_dir}: going on from it would overwrite the newer ones; resume the newest, or "
            "use this one with --eval-only")
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location=args.device, weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}: damaged or cut short); move it "
                         "aside and resume again") from None
    require(set(state["model"]) == {n for n, p in model.named_parameters() if p.requires_grad}, f"checkpoint {path} "
            "holds other trainable weights than this model; resume with the settings it was saved with")
    model.load_state_dict(state["model"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        for group, lr_lambda in zip(optimizer.param_groups, schedule.lr_lambdas):  # the schedule of this run's length
            group["lr"] = group["initial_lr"] * lr_lambda(schedule.last_epoch)
    return state

def metrics_log(run, step):
    """Cut run/metrics.jsonl back to the steps up to `step`, the one resumed; return what appends a line to it."""
    path = os.path.join(run, "metrics.jsonl")
    if world()[0] == 0 and os.path.exists(path):
        write_atomically(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path) if r["step"] <= step))
    def log(step, metrics):
        if world()[0] == 0:
            with open(path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
    return log

@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order

def prompts_at(examples, seed, position, count):
    """Prompts number position .. position + count - 1 of an endless stream that visits the examples in a fresh
    seeded order every epoch (a checkpoint saves the position)."""
    return [examples[epoch_order(len(examples), seed, p // len(examples))[p % len(examples)]]
            for p in range(position, position + count)]

STOP_SIGNALS = []

def stop_requested(args):
    """Whether Ctrl-C or SIGTERM came to this process or, under DDP, to any."""
    return over_ranks({"signals": len(STOP_SIGNALS)}, args, "max")["signals"] > 0

@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C (SIGINT) or SIGTERM asks to stop after the step in progress; a second one stops at once."""
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

def stopped(done, total_steps, saved_now, args):
    """After a stop: say how to resume, and exit with 128 + the signal."""
    launcher = f"torchrun --nproc_per_node {world()[1]} agrpo.py" if world()[1] > 1 else "python agrpo.py"
    say(f"stopped by {signal.Signals(STOP_SIGNALS[0]).name} after step {done} of {total_steps}"
        f"{' (checkpoint saved)' if saved_now else ''}; resume with: {launcher} --resume {args.output_dir}")
    raise SystemExit(128 + STOP_SIGNALS[0])


# ----------------------------------------------------------------------------------------------------------
# The command line: flags, the toy preset, resumed settings, one sentence per usage error
def flag(name):
    return "--" + name.replace("_", "-")

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence through main, not argparse's usage dump
        raise UsageError(message + "; see --help")

GROUPS = {"task": "task and model", "lora_rank": "LoRA (the authors' adapters)", "learning_rate": "optimisation",
          "group_size": "rollouts (generation as a denoising MDP)", "estimator": "the estimator and the objective",
          "eval_every": "evaluation (the authors': greedy, C=256, BL=32)", "output_dir": "runs and checkpoints"}

def build_parser():
    """One flag per field of Args, its help showing its default and toy values; parsing returns only what was typed."""
    parser = Parser(prog="agrpo.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
                    usage="python agrpo.py [--flag value ...]   (torchrun ... agrpo.py for DDP)",
                    description="AGRPO for masked diffusion language models (README.md). Defaults: the authors' "
                                "settings for LLaDA-8B-Instruct on a GPU; --model toy --device cpu runs offline.")
    group = parser
    for f in dataclasses.fields(Args):
        group = parser.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group  # a --help section starts
        toy = [f"{task} {v[f.name]}" if task else str(v[f.name]) for task, v in [("", TOY), *TOY_TASKS.items()]
               if f.name in v]
        shown = [f"default: {f.default}"] * (f.default is not None) + [f"toy: {', '.join(toy)}"] * bool(toy)
        options = dict(help=(f.metadata["help"] + f" ({'; '.join(shown)})" * bool(shown)).replace("%", "%%"))
        if f.type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(f.type) is Literal:
            options["choices"] = typing.get_args(f.type)
        else:  # int, float, str, or Optional of one of them
            options["type"] = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
            options["metavar"] = {int: "N", float: "X"}.get(options["type"], f.name.split("_")[-1].upper())
        group.add_argument(flag(f.name), **options)
    return parser

SAVED = {f.name for f in dataclasses.fields(Args)} - {"resume", "eval_only"}  # what a resumed run keeps

def parse_args(argv=None):
    """The settings, each over the ones before: Args' defaults, the toy preset (and its task's), a resumed run's saved
    settings, the flags typed. Validated."""
    parser = build_parser()
    chosen = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    if "num_train_epochs" in chosen:  # asked for: it sets the length, over a preset's or a saved max_steps
        chosen.setdefault("max_steps", None)
    saved = {}
    if chosen.get("resume"):
        checkpoint = find_resume(chosen["resume"])
        with open(os.path.join(checkpoint, "args.json")) as f:
            saved = {k: v for k, v in json.load(f).items() if k in SAVED}
        chosen.update(output_dir=os.path.dirname(os.path.normpath(checkpoint)), resume=checkpoint)  # its own directory
        say(f"resume: {checkpoint}")
    settings = {**saved, **chosen}
    preset = {**TOY, **TOY_TASKS.get(settings.get("task", "countdown"), {})} if settings.get("model") == "toy" else {}
    args = Args(**{**preset, **settings})
    validate(args)
    return args

BOUNDS = [  # fields, test, what they must be
    ("prompts_per_step micro_batch_size completion_length block_length sampling_steps eval_completion_length "
     "eval_block_length mc_samples num_iterations eval_batch_size keep_checkpoints max_steps", lambda v: v >= 1,
     "at least 1"),
    ("mask_token_id eos_token_id train_examples eval_examples lora_rank top_k eval_top_k eval_every save_every "
     "learning_rate weight_decay beta eval_temperature toy_warmup_steps", lambda v: v >= 0, "0 or more"),
    ("lora_alpha max_grad_norm num_train_epochs epsilon", lambda v: v > 0, "more than 0"),
    ("temperature", lambda v: v > 0, "more than 0 (greedy decoding, 0, is for --eval-temperature)"),
    ("adam_beta1 adam_beta2 warmup_ratio lora_dropout p_mask_prompt", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("top_p eval_top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("group_size", lambda v: v >= 2, "at least 2 (advantages compare the completions of a prompt)")]

def check_geometry(C, BL, T, prefix="--"):
    """C/BL blocks, each revealed in T/(C/BL) steps of k = C/T tokens."""
    flags = [f"{prefix}completion-length {C}", f"{prefix}block-length {BL}", f"{prefix}sampling-steps {T}"]
    require(C % BL == 0, f"{flags[1]} does not fit {flags[0]}: the blocks must tile the completion (BL dividing C)")
    require(C % T == 0 and T % (C // BL) == 0, f"{flags[2]} does not fit {flags[0]} and {flags[1]}: T must divide "
            f"C (whole tokens a step) and be a multiple of the C/BL = {C // BL} blocks (whole steps a block)")

def validate(args):
    """Check every setting before anything runs; the first that cannot work raises UsageError naming the fix."""
    for names, ok, what in BOUNDS:
        for name in names.split():
            value = getattr(args, name)
            require(value is None or ok(value), f"{flag(name)} {value}: must be {what}")
    require(args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device),
            f"--device {args.device}: use cuda, cuda:N (a GPU) or cpu")
    require(args.beta == 0 or args.lora_rank > 0,
            "--beta > 0 needs LoRA (--lora-rank > 0): the reference is the model with its adapters off")
    require(args.estimator != "agrpo" or args.unmasking == "random", "--unmasking low_confidence cannot train with "
            "--estimator agrpo: the positions a step reveals would depend on the parameters, so AGRPO's gradient would "
            "be biased; use --unmasking random (evaluation keeps low_confidence: --eval-unmasking)")
    check_geometry(args.completion_length, args.block_length, args.sampling_steps)
    require(re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", args.eval_sampling_steps),
            f"--eval-sampling-steps {args.eval_sampling_steps}: give step counts like 128,64,32")
    for T in map(int, args.eval_sampling_steps.split(",")):
        check_geometry(args.eval_completion_length, args.eval_block_length, T, "--eval-")
    require(args.update_schedule == "paper" or args.prompts_per_step * args.group_size // args.micro_batch_size
            % 2 == 0, "--update-schedule released needs an even number of micro-batches a step (the authors' "
            "run: 8 processes x 2); change --prompts-per-step or --micro-batch-size")

def setup(args):
    """Processes, data, model and tokenizer: what can fail for reasons outside the code, each failure one sentence."""
    require(not args.device.startswith("cuda") or torch.cuda.is_available(), "CUDA is not available here. "
            "LLaDA-8B needs a GPU (see README); for an offline CPU run use --model toy --device cpu")
    if "RANK" in os.environ and not dist.is_initialized():  # under torchrun: one process per GPU
        if args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(args.device)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    n = world()[1]
    require(args.prompts_per_step % n == 0 and args.prompts_per_step // n * args.group_size % args.micro_batch_size
            == 0, f"{n} process(es) need whole prompt groups, in micro-batches that split them: --prompts-per-step "
            f"divisible by {n}, --micro-batch-size dividing {args.prompts_per_step // n} x --group-size")
    if args.model == "toy":  # a fixed thread count gives the same numbers on every machine, whatever OMP_NUM_THREADS
        torch.set_num_threads(max(1, TOY_THREADS // n))
    try:
        train_examples = [] if args.eval_only else reward.load_examples(
            args.task, "train", args.data, n=args.train_examples or None, seed=args.seed)
        test_examples = reward.load_examples(args.task, "test", args.data, n=args.eval_examples or None,
                                             gsm8k_test=args.gsm8k_test) if args.eval_every or args.eval_only else []
    except reward.DataUnavailable as e:
        raise UsageError(str(e)) from None
    model, tokenizer = toy_model_and_tokenizer(args.seed) if args.model == "toy" else from_pretrained(args)
    if args.eos_token_id is None:
        args.eos_token_id = tokenizer.eos_token_id if model.config.eos_token_id is None else model.config.eos_token_id
    vocabulary = model.get_input_embeddings().num_embeddings
    require(args.mask_token_id < vocabulary, f"--mask-token-id {args.mask_token_id} is not in the model's "
            f"vocabulary of {vocabulary}; set it (the tokenizer's mask token is {tokenizer.mask_token_id})")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if args.model == "toy" and args.toy_warmup_steps and not (args.resume and not args.lora_rank):
        warm_up_toy(model, tokenizer, args)  # (a toy checkpoint without adapters holds every weight)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    if args.lora_rank > 0:
        add_lora(model, args)
    if args.activation_checkpointing and hasattr(getattr(model, "model", None), "set_activation_checkpointing"):
        model.model.set_activation_checkpointing("whole_layer")  # LLaDA's remote code: less memory, ~1/3 more time
    elif args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, train_examples, test_examples

def main(argv=None):
    """Train or evaluate as the flags say; a usage error ends in one sentence, any other error keeps its traceback."""
    try:
        args = parse_args(argv)
        model, tokenizer, train_examples, test_examples = setup(args)
        step = load_checkpoint(args.resume, model, args)["step"] if args.resume and args.eval_only else 0
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
    except OSError as e:  # a full disk, a read-only or missing file or directory: one sentence naming it
        if not e.filename:
            raise
        raise SystemExit(f"agrpo: {e.filename}: {(e.strerror or str(e)).lower()}") from None
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing half-written is left
        print("agrpo: stopped by SIGINT", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        if dist.is_initialized():
            dist.barrier()  # let rank 0 finish writing before any process leaves
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
