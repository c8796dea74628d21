"""Tests that this is AGRPO: run `pytest test_agrpo.py` (CPU, offline, well under a minute).

1. The estimator is unbiased: exact enumeration on toy problems, z-tests with fixed seeds, and planted
   biased estimators that the same tests reject.
2. The sampler and the trainer agree: recomputed log-probs equal the recorded ones.
3. The sampler keeps its invariants and draws from the truncated distribution.
4. The rewards are right, also on hostile completions.
5. End to end: a toy model learns, and `main()` runs, logs and checkpoints.
"""
import copy
import dataclasses
import errno
import glob
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

import agrpo
import reward
from agrpo import Args

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """The toy warm-up caches its weights under $XDG_CACHE_HOME: each test keeps its own. A toy run sets its own
    thread count; each test starts on one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(1)


EOS, MASK = 0, 3  # toy vocabulary: EOS, a, b, MASK (the mask id can be sampled too: it is in the vocabulary)


def tiny_model(seed=0, vocab=4, eos_bias=0.0, scale=1.0):
    """A one-layer bidirectional BERT from a transformers config, with spread-out random weights drawn here
    (matrices N(0, scale^2), layer norms 1, biases 0), so they do not depend on the library's initialisation."""
    config = BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertForMaskedLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen) if p.dim() > 1 else
                    torch.ones_like(p) if "LayerNorm.weight" in name else torch.zeros_like(p))
        model.cls.predictions.bias[EOS] += eos_bias
    return model


def toy_args(**kw):
    base = dict(completion_length=3, block_length=3, sampling_steps=3, mask_token_id=MASK, eos_token_id=EOS,
                temperature=1.0, top_k=0, top_p=1.0, group_size=4, mc_samples=2, prompts_per_step=1, device="cpu",
                dtype="float32")
    return Args(**{**base, **kw})


def prompt(batch, ids=(1, 2)):
    p = torch.tensor([ids]).expand(batch, -1)
    return p, torch.ones_like(p)


def rows_of(rollout, rows):
    """The rollout of some of its completions."""
    values = (getattr(rollout, f.name) for f in dataclasses.fields(rollout))
    return agrpo.Rollout(*(None if v is None else v[rows] for v in values))


def agrpo_backward(model, rollout, advantages, args, generator=None):
    """Back-propagate AGRPO's M losses on a micro-batch, as the training step does; returns the largest |r - 1|
    and whether the clip bound any token."""
    deviation, clipped = 0.0, False
    for loss, (ratio, adv, _) in agrpo.agrpo_losses(model, rollout, advantages, args, generator):
        loss.backward()
        deviation = max(deviation, float((ratio.detach() - 1).abs().max()))
        clipped |= bool(((ratio - 1).abs() > args.epsilon).any())
    return deviation, clipped


def flat_grad(model):
    g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


FAST = ["--task", "countdown", "--model", "toy", "--completion-length", "16", "--sampling-steps", "8",
        "--prompts-per-step", "2", "--group-size", "4", "--micro-batch-size", "4", "--mc-samples", "2",
        "--train-examples", "64", "--toy-warmup-steps", "0", "--eval-every", "0"]
AGRPO = os.path.abspath(agrpo.__file__)


def count_1(task, completion, example):
    """A reward the random toy model can improve on: the share of '1' among the characters it writes."""
    return {"format": 0.0, "correct": completion.count("1") / max(len(completion), 1), "answer": None}


def trained(path):
    return torch.load(os.path.join(path, "state.pt"))["model"]


def metric_lines(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def z_scores(draws, expected, seed=0, directions=12):
    """z of the draws' mean against `expected`, on the expected direction and on 12 random directions; the
    standard error is estimated from the draws.

    The tests accept |z| < 4. For an unbiased estimator each z is a t statistic with n - 1 >= 299 degrees of
    freedom, P(|z| > 4) < 1e-4, so a test's 13 z's raise a false alarm with probability < 0.13% and the
    92 z's that the suite requires below 4 (seven tests) < 1% (union bound). The seeds are fixed, so the suite
    is deterministic: the threshold was not tuned to them, and the planted biases below reach |z| of 10 and
    more, so a fixed seed costs no power."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.cat([expected[None] / expected.norm(), torch.randn(directions, expected.numel(), generator=gen)])
    proj, target = draws.double() @ v.double().T, v.double() @ expected.double()
    se = proj.std(0) / math.sqrt(len(draws))
    return (proj.mean(0) - target) / se


# ------------------------------------------------------------------------------------------------------------
# 1a. Per trajectory: the mean of AGRPO's gradients is the step average (1/L) sum_t g_t
def plain_step_gradients(model, rollout, args):
    """g_t for every step t < L, the plain way: full logits of the rebuilt state, a boolean support mask."""
    B, C = rollout.tokens.shape
    L = [max([int(s) + 1 for s, x in zip(rollout.revealed_at[b], rollout.tokens[b]) if x != args.eos_token_id],
             default=0)
         for b in range(B)]
    grads = []
    for b in range(B):
        per_step = []
        for t in range(L[b]):
            state = rollout.tokens[b].clone()
            state[rollout.revealed_at[b] >= t] = args.mask_token_id
            ids = torch.cat([rollout.prompt_ids[b], state])[None]
            logits = model(input_ids=ids).logits[0, rollout.prompt_ids.shape[1]:].float() / args.temperature
            total = 0
            for i in (rollout.revealed_at[b] == t).nonzero().flatten():
                allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
                if rollout.support is not None:
                    allowed[:] = False
                    allowed[rollout.support[b, i, :rollout.support_size[b, i]]] = True
                total = total + logits[i].masked_fill(~allowed, -math.inf).log_softmax(-1)[rollout.tokens[b, i]]
            total.backward()
            per_step.append(flat_grad(model))
        grads.append(torch.stack(per_step))
    return grads, L


def estimator_draws(model, rollout, args, n, seed):
    """n independent gradients of agrpo_losses (advantage 1, G = 1), each times -G."""
    gen = torch.Generator().manual_seed(seed)
    ones = torch.ones(rollout.tokens.shape[0])
    draws = []
    for _ in range(n):
        agrpo_backward(model, rollout, ones, args, gen)
        draws.append(-flat_grad(model) * args.group_size)
    return torch.stack(draws)


@pytest.fixture(scope="module")
def long_rollout():
    """Two completions of 8 tokens, 8 steps, one token a step, often ending in EOS (so L < T)."""
    model = tiny_model(seed=4, eos_bias=2.0, scale=2.0)  # sharp, step-dependent entropies
    args = toy_args(completion_length=8, block_length=8, sampling_steps=8, group_size=1, mc_samples=2)
    rollout = agrpo.generate(model, *prompt(2), args, torch.Generator().manual_seed(1))
    grads, L = plain_step_gradients(model, rollout, args)
    assert 0 < min(L) < 8, "the fixture should exercise L < T"
    exact = sum(g.sum(0) / len(g) for g in grads)
    return model, rollout, args, exact, grads


@pytest.mark.parametrize("sampling,low_discrepancy", [("uniform", False), ("entropy", False), ("entropy", True)])
def test_estimator_unbiased_per_trajectory(long_rollout, sampling, low_discrepancy):
    """For a fixed rollout, the mean of 300 AGRPO gradients is the step average (1/L) sum_t g_t computed
    step by step with full logits: uniform and entropy timestep sampling, with and without low discrepancy."""
    model, rollout, base, exact, _ = long_rollout
    args = dataclasses.replace(base, importance_sampling=sampling, low_discrepancy=low_discrepancy)
    z = z_scores(estimator_draws(model, rollout, args, 300, seed=7), exact)
    assert z.abs().max() < 4, z


def test_a_uniform_at_the_top_of_its_range_still_draws_a_live_step(monkeypatch):
    """u just below 1 can exceed q's last cumulative sum once rounded (here 1 - 2e-16); the step drawn is still
    one of 0..L-1, with a finite importance weight."""
    args = toy_args(completion_length=8, block_length=8, sampling_steps=8, mc_samples=1, low_discrepancy=False)
    entropy = torch.tensor([[0.3, 0.3, 0.3, 0.1, 0.2, 0.3, 0.3, 0.5]])  # one token a step, 8 steps
    rollout = types.SimpleNamespace(revealed_at=torch.arange(8)[None], entropy=entropy, tokens=torch.ones(1, 8))
    L = agrpo.trajectory_length(rollout, args)
    top = 1 - 2 ** -53  # the largest float64 below 1
    monkeypatch.setattr(torch, "rand", lambda n, dtype=None, device=None, generator=None: torch.full((n,), top,
                                                                                                    dtype=dtype))
    t, weight = agrpo.sample_timesteps(rollout, L, args)
    assert t.tolist() == [[7]] and 0 < weight.item() < 10, (t, weight)


def no_importance_weight(rollout, L, args, generator=None):
    t, w = PLAIN_SAMPLER(rollout, L, args, generator)
    return t, torch.ones_like(w)


def off_by_one(rollout, L, args, generator=None):
    """Uniform steps drawn as floor(u (L - 1)): the last step L - 1 is never drawn."""
    u = torch.rand(L.numel(), args.mc_samples, generator=generator)
    return (u * (L[:, None] - 1).clamp_min(0)).long(), torch.ones_like(u)


def always_last_step(rollout, L, args, generator=None):
    t = (L[:, None] - 1).clamp_min(0).expand(-1, args.mc_samples)
    return t, torch.ones(t.shape)


PLAIN_SAMPLER = agrpo.sample_timesteps


@pytest.mark.parametrize("plant,sampling", [(no_importance_weight, "entropy"), (off_by_one, "uniform")])
def test_planted_bias_is_rejected_per_trajectory(long_rollout, monkeypatch, plant, sampling):
    """The same test rejects a biased timestep sampler: it has power."""
    model, rollout, base, exact, _ = long_rollout
    monkeypatch.setattr(agrpo, "sample_timesteps", plant)
    args = dataclasses.replace(base, importance_sampling=sampling)
    z = z_scores(estimator_draws(model, rollout, args, 300, seed=7), exact)
    assert z.abs().max() > 4, z


# ------------------------------------------------------------------------------------------------------------
# 1b. Whole policy gradient: enumerate every trajectory, compare with the mean AGRPO gradient
def toy_reward(tokens):
    return float((tokens == 1).sum() + 2 * (tokens[-1] == 2))


def exact_objectives(model, args, ids=(1, 2)):
    """Enumerate every trajectory (unmasking order and tokens) of a one-block sampler revealing one token a
    step. Returns, differentiable in the parameters:
      J   = sum_tau p R, the expected reward;
      S_R = sum_tau sg(p R / L) sum_{t < L} log pi_t and S_1 = sum_tau sg(p / L) sum_{t < L} log pi_t, whose
            gradients are E[R h] and E[h] for AGRPO's step average h = (1/L) sum_{t < L} g_t (steps that
            reveal only trailing EOS stay out, as in the paper; sg = stop-gradient)."""
    C, V, P = args.completion_length, model.config.vocab_size, len(ids)
    prefix = torch.tensor(ids)
    sums = [0.0, 0.0, 0.0]

    def policy(state):  # plain path: full logits, top-k by comparison with the k-th largest
        z = model(input_ids=torch.cat([prefix, state])[None]).logits[0, P:] / args.temperature
        if args.top_k:
            z = z.masked_fill(z < z.topk(args.top_k, -1).values[:, -1:], -math.inf)
        return z.log_softmax(-1)

    def walk(state, revealed, steps):  # steps: log pi of the token revealed at each step so far
        hidden = [i for i in range(C) if revealed[i] < 0]
        if not hidden:
            real = [revealed[i] for i in range(C) if state[i] != args.eos_token_id]
            L, R = (max(real) + 1 if real else 0), toy_reward(state)
            p = (sum(steps) - sum(math.log(C - t) for t in range(C))).exp()  # orders: 1/C, 1/(C-1), ...
            sums[0] = sums[0] + p * R
            if L:
                surrogate = sum(steps[:L])
                sums[1] = sums[1] + (p * R / L).detach() * surrogate
                sums[2] = sums[2] + (p / L).detach() * surrogate
            return
        logq = policy(state)
        for i in hidden:  # random unmasking: each hidden position with probability 1 / len(hidden)
            for v in range(V):
                if logq[i, v] > -math.inf:
                    s, r = state.clone(), list(revealed)
                    s[i], r[i] = v, C - len(hidden)
                    walk(s, r, steps + [logq[i, v]])

    walk(torch.full((C,), args.mask_token_id), [-1] * C, [])
    return sums


def policy_gradient_draws(model, args, groups, seed, baseline):
    gen = torch.Generator().manual_seed(seed)
    G = args.group_size
    rollout = agrpo.generate(model, *prompt(groups * G), args, gen)
    R = torch.tensor([toy_reward(x) for x in rollout.tokens])
    A = agrpo.group_advantages(R, G) if baseline == "group" else R
    draws = []
    for g in range(groups):
        agrpo_backward(model, rows_of(rollout, slice(g * G, (g + 1) * G)), A[g * G:(g + 1) * G], args, gen)
        draws.append(-flat_grad(model))
    return torch.stack(draws)


def gradient(model, scalar):
    """grad of a scalar (the graph is kept for the next one)."""
    model.zero_grad(set_to_none=True)
    scalar.backward(retain_graph=True)
    return flat_grad(model)


def expected_gradient(model, args, baseline):
    """E[-grad of the loss of one group] = E[R h] for a fixed baseline 0, and (1 - 1/G)(E[R h] - J E[h]) for
    the group mean (the baseline's own sample is excluded). Without EOS (L = T always) E[R h] = grad J / T."""
    J, S_R, S_1 = exact_objectives(model, args)
    if baseline == "group":
        return (1 - 1 / args.group_size) * (gradient(model, S_R) - J.detach() * gradient(model, S_1))
    return gradient(model, S_R)


def test_enumeration_without_eos_is_the_policy_gradient_over_T():
    """With no EOS, AGRPO's expected step average is exactly grad J / T: the enumeration agrees."""
    model, args = tiny_model(seed=3), toy_args(eos_token_id=99)
    J, S_R, _ = exact_objectives(model, args)
    assert torch.allclose(gradient(model, S_R), gradient(model, J) / 3, atol=1e-6)


PG_CASES = {"group-baseline": ("group", {}),
            "fixed-baseline-top-k": ("fixed", dict(temperature=0.7, top_k=2)),
            "no-eos-true-gradient": ("fixed", dict(eos_token_id=99))}


@pytest.mark.parametrize("case", PG_CASES)
def test_policy_gradient_unbiased(case):
    """Over rollouts from generate, the mean AGRPO gradient equals the estimator's exact expectation from
    enumerating every trajectory: with the group-mean baseline, with top-k and temperature, and without EOS
    (where it is the true policy gradient over T)."""
    baseline, kw = PG_CASES[case]
    model, args = tiny_model(seed=1, eos_bias=0.5), toy_args(**kw)
    expected = expected_gradient(model, args, baseline)
    assert expected.norm() > 0.1, "the case should have a policy gradient to estimate"
    z = z_scores(policy_gradient_draws(model, args, 300, seed=11, baseline=baseline), expected)
    assert z.abs().max() < 4, z


def test_planted_bias_is_rejected_whole_gradient(monkeypatch):
    """Always training on the last step L - 1 is biased, and the whole-gradient test sees it."""
    monkeypatch.setattr(agrpo, "sample_timesteps", always_last_step)
    model, args = tiny_model(seed=1, eos_bias=0.5), toy_args()
    expected = expected_gradient(model, args, "group")
    z = z_scores(policy_gradient_draws(model, args, 600, seed=11, baseline="group"), expected)
    assert z.abs().max() > 4, z


# ------------------------------------------------------------------------------------------------------------
# 1c. The baseline the paper argues against: diffu-GRPO's mean-field estimate is biased, AGRPO's is not
def completion_probabilities(model, args, ids=(1, 2)):
    """p(x) of every final completion x of the one-block sampler (one token a step, random order), summed over
    the orders that reach it; detached."""
    C, V, P, prefix, probs = args.completion_length, model.config.vocab_size, len(ids), torch.tensor(ids), {}

    def walk(state, hidden, logp):  # (a sampled MASK id counts as revealed: positions are tracked, not ids)
        if not hidden:
            probs[tuple(state.tolist())] = probs.get(tuple(state.tolist()), 0.0) + float(logp.exp())
            return
        with torch.no_grad():
            logq = (model(input_ids=torch.cat([prefix, state])[None]).logits[0, P:] / args.temperature).log_softmax(-1)
        for i in hidden:
            for v in range(V):
                s = state.clone()
                s[i] = v
                walk(s, [h for h in hidden if h != i], logp + logq[i, v] - math.log(len(hidden)))
    walk(torch.full((C,), MASK), list(range(C)), torch.zeros((), dtype=torch.float64))
    return probs


def exact_diffu_grpo_gradient(model, args, ids=(1, 2)):
    """E[-grad of diffu-GRPO's loss] for a fixed baseline 0, no EOS and one iteration (r = 1): the sum over final
    completions x and over the 2^P prompt masks of p(x) P(mask) R(x) grad (1/C) sum_i log softmax(logits_i)[x_i],
    the logits of one forward pass on the masked prompt and an all-mask completion (written here plainly)."""
    C, P, total = args.completion_length, len(ids), 0.0
    probs = completion_probabilities(model, args, ids)
    for masked in itertools.product([False, True], repeat=P):
        chance = math.prod(args.p_mask_prompt if m else 1 - args.p_mask_prompt for m in masked)
        noisy = torch.tensor([MASK if m else i for m, i in zip(masked, ids)])
        logp = model(input_ids=torch.cat([noisy, torch.full((C,), MASK)])[None]).logits[0, P:].log_softmax(-1)
        for x, p in probs.items():
            total = total + chance * p * toy_reward(torch.tensor(x)) * logp[torch.arange(C), list(x)].sum() / C
    return gradient(model, total)


def estimator_gradient_draws(model, args, groups, seed):
    """One -gradient per group of the estimator args.estimator chooses, as the training step computes it
    (rewards as advantages: a fixed baseline 0; one iteration)."""
    gen = torch.Generator().manual_seed(seed)
    G = args.group_size
    rollout = agrpo.generate(model, *prompt(groups * G), args, gen)
    R = torch.tensor([toy_reward(x) for x in rollout.tokens])
    share = agrpo.token_shares(rollout.tokens, args)
    draws = []
    for g in range(groups):
        rows = slice(g * G, (g + 1) * G)
        if args.estimator == "agrpo":
            agrpo_backward(model, rows_of(rollout, rows), R[rows], args, gen)
        else:
            masked = agrpo.mask_prompt(rollout.prompt_ids[rows], args, gen)
            for loss, _ in agrpo.diffu_grpo_losses(model, rows_of(rollout, rows), R[rows], masked, None, share[rows],
                                                   args):
                loss.backward()
        draws.append(-flat_grad(model))
    return torch.stack(draws)


def test_diffu_grpo_is_biased_and_agrpo_is_not():
    """The paper's claim, exactly. With no EOS, AGRPO's expected gradient is grad J / T (enumerated above), so
    its mean over 300 sampled groups has no component orthogonal to the true policy gradient grad J. diffu-GRPO's
    exact expectation (every completion, every prompt mask) points 49.7 degrees away from grad J on this toy
    (seed 3; 25.6 and 5.7 degrees at seeds 1 and 2: its error depends on the model), and its sampled mean, which
    matches that expectation (|z| < 4), shows the orthogonal component at |z| = 12.6 (asserted > 8), AGRPO's at
    0.5 (< 4). The angle threshold of 30 degrees sits between 0 (AGRPO) and 49.7; both are exact, not noisy."""
    model = tiny_model(seed=3, eos_bias=0.5)
    args = toy_args(eos_token_id=99, p_mask_prompt=0.15)
    true = gradient(model, exact_objectives(model, args)[0])  # grad J
    biased = exact_diffu_grpo_gradient(model, args)
    angle = math.degrees(math.acos(float(true @ biased / (true.norm() * biased.norm()))))
    assert angle > 30, angle
    away = biased - (biased @ true) / (true @ true) * true  # the part of diffu-GRPO's mean that is not grad J
    away = away / away.norm()
    diffu = estimator_gradient_draws(model, dataclasses.replace(args, estimator="diffu-grpo"), 300, seed=5)
    ours = estimator_gradient_draws(model, args, 300, seed=5)
    assert z_scores(diffu, biased).abs().max() < 4  # the code computes d1's estimator
    z_away = lambda draws: float((draws.double() @ away.double()).mean() / ((draws.double() @ away.double()).std()
                                                                           / math.sqrt(len(draws))))
    assert abs(z_away(ours)) < 4 and abs(z_away(diffu)) > 8, (z_away(ours), z_away(diffu))


def test_diffu_grpo_log_probs_are_one_masked_forward_and_one_iteration_has_ratio_1(toy):
    """diffu-GRPO masks each prompt token with probability p_mask_prompt; its per-token log-probs are log softmax
    of the raw logits of one forward pass on the masked prompt and an all-mask completion (temperature 1, no
    truncation, whatever the sampler used), as computed here directly; with one gradient step per batch its
    ratio is exactly 1."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer, estimator="diffu-grpo", p_mask_prompt=0.5)
    ids, mask = toy_prompts(tokenizer, ["12+7=", "12+7="])
    rollout = agrpo.generate(model, ids, mask, args, torch.Generator().manual_seed(0))
    masked = agrpo.mask_prompt(ids, args, torch.Generator().manual_seed(1))
    assert (masked == args.mask_token_id).any() and (masked != args.mask_token_id).any()
    many = agrpo.mask_prompt(torch.ones(1000, 100, dtype=torch.long), dataclasses.replace(args, p_mask_prompt=0.15),
                             torch.Generator().manual_seed(2))
    assert abs((many == args.mask_token_id).double().mean() - 0.15) < 0.005  # each token with p: SE 0.0011
    C, P = args.completion_length, ids.shape[1]
    full = model(input_ids=torch.cat([masked, torch.full((2, C), args.mask_token_id)], 1)).logits[:, P:]
    direct = full.log_softmax(-1).gather(-1, rollout.tokens[..., None]).squeeze(-1)
    assert torch.allclose(agrpo.mean_field_logprobs(model, rollout, masked, args), direct, atol=1e-5)
    share = agrpo.token_shares(rollout.tokens, args)
    (loss, (ratio, _, _)), = agrpo.diffu_grpo_losses(model, rollout, torch.tensor([1.0, -1.0]), masked, None,
                                                     share, args)
    assert torch.equal(ratio, torch.ones_like(ratio))
    model.zero_grad(set_to_none=True)


def test_diffu_grpo_scores_a_padded_micro_batch_under_the_samplers_attention_mask(toy):
    """A micro-batch of prompts of different lengths is left-padded; diffu-GRPO scores it under the attention mask
    the sampler drew it with, so a padded row's log-probs do not depend on what the padding holds (without the
    mask they would)."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer, estimator="diffu-grpo")
    ids, mask = toy_prompts(tokenizer)  # "12+7=" left-padded to the length of the other prompt
    rollout = agrpo.generate(model, ids, mask, args, torch.Generator().manual_seed(0))
    assert rollout.prompt_attention is not None and not rollout.prompt_attention.all()
    other = ids.masked_fill(mask == 0, tokenizer.convert_tokens_to_ids("x"))  # the same prompts, other padding
    scored = [agrpo.mean_field_logprobs(model, rollout, prompt, args) for prompt in (ids, other)]
    assert torch.allclose(*scored, atol=1e-6)
    unmasked = dataclasses.replace(rollout, prompt_attention=None)
    assert not torch.allclose(*[agrpo.mean_field_logprobs(model, unmasked, p, args) for p in (ids, other)], atol=1e-3)


def test_diffu_grpo_kl_is_beta_k3_without_the_ratio(toy):
    """diffu-GRPO adds beta x k3(ref, logp) per token, as d1 does, without AGRPO's ratio factor: with zero
    advantages its gradient is beta grad sum_i share_i k3_i, the reference being the model with adapters off."""
    _, tokenizer = toy
    model = agrpo.toy_model_and_tokenizer(seed=0)[0]
    args = toy_run_args(tokenizer, estimator="diffu-grpo", beta=0.5, lora_rank=2, lora_targets="query,value")
    agrpo.add_lora(model, args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    ids, mask = toy_prompts(tokenizer, ["12+7=", "12+7="])
    rollout = agrpo.generate(model, ids, mask, args, torch.Generator().manual_seed(0))
    masked = agrpo.mask_prompt(ids, args, torch.Generator().manual_seed(1))
    share = agrpo.token_shares(rollout.tokens, args)
    ((loss, _),) = agrpo.diffu_grpo_losses(model, rollout, torch.zeros(2), masked, None, share, args)
    loss.backward()
    got = flat_grad(model)
    ids = torch.cat([masked, torch.full_like(rollout.tokens, args.mask_token_id)], 1)
    pick = lambda logits: logits[:, ids.shape[1] - rollout.tokens.shape[1]:].log_softmax(-1).gather(
        -1, rollout.tokens[..., None]).squeeze(-1)
    with agrpo.adapters_off(model), torch.no_grad():
        ref = pick(model(input_ids=ids).logits)
    logp = pick(model(input_ids=ids).logits)
    (0.5 * (share * ((ref - logp).exp() - (ref - logp) - 1)).sum()).backward()
    expected = flat_grad(model)
    assert expected.norm() > 1e-4 and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)  # k3 reaches e^5 here


def test_token_shares_count_up_to_the_first_eos_per_group():
    """diffu-GRPO's token mean: each completion's tokens up to and including its first EOS count, and each
    group's counted tokens share a weight of 1 in all."""
    tokens = torch.tensor([[5, 0, 5, 0], [5, 5, 5, 5], [0, 0, 0, 0], [5, 5, 0, 5]])  # EOS = 0, G = 2
    share = agrpo.token_shares(tokens, toy_args(group_size=2))
    expected = [[1 / 6, 1 / 6, 0, 0], [1 / 6] * 4, [1 / 4, 0, 0, 0], [1 / 4, 1 / 4, 1 / 4, 0]]
    assert torch.allclose(share, torch.tensor(expected))


# ------------------------------------------------------------------------------------------------------------
# 2. Sampler and trainer agree
@pytest.fixture(scope="module")
def toy():
    model, tokenizer = agrpo.toy_model_and_tokenizer(seed=0)
    return model.eval(), tokenizer


def toy_run_args(tokenizer, **kw):
    """toy_args for the toy model and its tokenizer (the sampler's truncations active)."""
    return toy_args(**{**dict(completion_length=16, block_length=8, sampling_steps=8, temperature=0.7, top_k=20,
                              top_p=0.9, group_size=2, mc_samples=3, mask_token_id=tokenizer.mask_token_id,
                              eos_token_id=tokenizer.eos_token_id), **kw})


def toy_prompts(tokenizer, texts=("12+7=", "a longer prompt: 3*4")):
    enc = tokenizer(list(texts), padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("unmasking", ["random", "low_confidence"])
def test_recomputed_logprobs_equal_recorded(toy, unmasking):
    """The trainer's log-probs of the tokens revealed at each step (state rebuilt by re-masking, recorded
    support, temperature) equal the sampler's, with temperature, top-k and top-p active, so the ratio starts
    at 1. Tolerance 1e-5: the same float32 state through two forward passes that differ in batch rows and in
    the positions fed to the output layer agree to ~1e-6; a wrong state, support or temperature moves log-probs
    by more than 1e-2."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer, unmasking=unmasking)
    rollout = agrpo.generate(model, *toy_prompts(tokenizer), args, torch.Generator().manual_seed(0))
    assert rollout.support is not None and (rollout.support_size < 20).any(), "top-p must be active"
    for t in range(args.sampling_steps):
        logp, pos = agrpo.revealed_logprobs(model, rollout, torch.full((2,), t), args)
        assert torch.allclose(logp, rollout.logp.gather(1, pos), atol=1e-5), t
    deviation, clipped = agrpo_backward(model, rollout, torch.tensor([1.0, -1.0]), args,
                                        torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    assert deviation < 1e-5 and not clipped


def test_lean_logits_equal_full_logits(toy):
    """logits_at (output layer on the needed positions only) gives the full path's values and gradients."""
    model, tokenizer = toy
    ids, mask = toy_prompts(tokenizer)
    pos = torch.tensor([[0, 5, 9], [2, 3, 11]])
    lean = agrpo.logits_at(model, ids, mask, pos)
    lean.square().sum().backward()
    g_lean = flat_grad(model)
    full = model(input_ids=ids, attention_mask=mask).logits
    full = full.gather(1, pos[..., None].expand(-1, -1, full.shape[-1]))
    full.square().sum().backward()
    assert torch.allclose(lean, full, atol=1e-6) and torch.allclose(g_lean, flat_grad(model), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# 3. Sampler invariants and the truncated distribution
def test_sampler_invariants(toy):
    """generate is reproducible from its generator, reveals k tokens a step inside the step's block, ends a row
    after an all-EOS block with EOS filler from the next block boundary on (marked step T), and the filler is
    never a sampled timestep."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer, completion_length=24, block_length=8, sampling_steps=12)
    with torch.no_grad():
        model.cls.predictions.bias[tokenizer.eos_token_id] += 6.0  # make EOS blocks, hence early exits, likely
    try:
        rollout = agrpo.generate(model, *toy_prompts(tokenizer, ["x"] * 8), args, torch.Generator().manual_seed(0))
        again = agrpo.generate(model, *toy_prompts(tokenizer, ["x"] * 8), args, torch.Generator().manual_seed(0))
    finally:
        with torch.no_grad():
            model.cls.predictions.bias[tokenizer.eos_token_id] -= 6.0
    T, k, steps_per_block = 12, 2, 4
    assert all(torch.equal(getattr(rollout, f), getattr(again, f)) for f in ("tokens", "revealed_at", "logp"))
    assert not (rollout.revealed_at == T).all(1).any()
    exited = 0
    for b in range(8):
        s, x = rollout.revealed_at[b], rollout.tokens[b]
        filler = s == T
        if filler.any():  # early exit: filler starts at a block boundary after an all-EOS block, and is EOS
            start = int(filler.nonzero()[0])
            assert start % 8 == 0 and filler[start:].all() and (x[start - 8:] == args.eos_token_id).all()
            exited += 1
        for t in range(int(s[~filler].max()) + 1):  # k tokens a step, inside the step's block
            where = (s == t).nonzero().flatten()
            assert len(where) == k and (where // 8 == t // steps_per_block).all()
    assert 0 < exited < 8, "the test should see both early exits and full rows"
    L = agrpo.trajectory_length(rollout, args)
    t, w = agrpo.sample_timesteps(rollout, L, args, torch.Generator().manual_seed(0))
    assert (t < L.clamp_min(1)[:, None]).all() and (w[L == 0] == 0).all()  # filler never enters the loss


def test_greedy_is_deterministic(toy):
    """At temperature 0 (evaluation) decoding does not depend on the random generator."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer, temperature=0.0, unmasking="low_confidence")
    a, b = (agrpo.generate(model, *toy_prompts(tokenizer), args, torch.Generator().manual_seed(s)) for s in (0, 1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.revealed_at, b.revealed_at)


def claimed_distribution(logits, temperature, top_k, top_p):
    """The sampler's rule written plainly: softmax(logits / temperature) over the top-k tokens, renormalised;
    then its most probable tokens while their cumulative mass stays <= top_p (at least one), renormalised."""
    p = (logits / temperature).softmax(-1)
    order = p.argsort(descending=True)[:top_k]
    kept = p[order] / p[order].sum()
    n = max(1, int((kept.cumsum(0) <= top_p).sum()))
    q = torch.zeros_like(p)
    q[order[:n]] = kept[:n] / kept[:n].sum()
    return q


def test_gumbel_max_draws_from_the_claimed_truncated_distribution():
    """40,000 draws of sample_tokens follow the claimed rule (chi-square), and the recorded log-prob and
    entropy are those of the truncated, tempered distribution. The case separates the rule from wrong ones:
    top-p over the whole vocabulary's mass, or top-k after top-p, would keep 4 tokens where the rule keeps 3;
    and with 3 candidates a flipped Gumbel sign changes the distribution."""
    p = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    logits, args = 0.8 * p.log(), Args(temperature=0.8, top_k=5, top_p=0.9)  # tempered: back to log p
    expected = claimed_distribution(logits, 0.8, 5, 0.9)
    assert (expected > 0).sum() == 3 and (p.cumsum(0) <= 0.9).sum() == 4  # the rule and the wrong rules differ
    draw = agrpo.sample_tokens(logits.expand(40000, -1), args, torch.Generator().manual_seed(0))
    counts = torch.bincount(draw.tokens, minlength=6).double()
    keep = expected > 0
    assert counts[~keep].sum() == 0
    chi2 = ((counts - 40000 * expected)[keep] ** 2 / (40000 * expected[keep])).sum()
    assert chi2 < 20, (chi2, counts, expected)  # 2 degrees of freedom: P(chi2 > 20) = exp(-10) < 1e-4
    assert torch.allclose(draw.logp, expected.log()[draw.tokens], atol=1e-6)
    q = expected[keep]
    assert torch.allclose(draw.entropy, -(q * q.log()).sum().expand(40000), atol=1e-6)


def test_low_confidence_reveals_the_most_confident_positions(toy):
    """low_confidence unmasking (greedy, as in evaluation) reveals at each step the k still-masked positions
    whose best token the model is surest of, computed here from the rebuilt state with full logits."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer, temperature=0.0, unmasking="low_confidence", completion_length=8,
                        block_length=8, sampling_steps=4)  # k = 2 of 8 positions a step
    ids, mask = toy_prompts(tokenizer, ["12+7="])
    rollout = agrpo.generate(model, ids, mask, args)
    for t in range(3):  # the last step takes the 2 positions left
        state = rollout.tokens[0].masked_fill(rollout.revealed_at[0] >= t, args.mask_token_id)
        with torch.no_grad():
            logits = model(input_ids=torch.cat([ids[0], state])[None]).logits[0, ids.shape[1]:]
        confidence = logits.log_softmax(-1).max(-1).values
        revealed, masked = rollout.revealed_at[0] == t, rollout.revealed_at[0] >= t
        assert revealed.sum() == 2 and confidence[revealed].min() >= confidence[masked & ~revealed].max() - 1e-5


def test_ppo_clip_acts_on_both_sides():
    """-min(r A, clip(r, 1 - eps, 1 + eps) A): the gradient vanishes where the clip binds (A > 0 and r > 1 + eps,
    A < 0 and r < 1 - eps) and is -A r grad log pi on the other side of each and inside the clip range."""
    model, args = tiny_model(seed=5), toy_args(eos_token_id=99, group_size=1, mc_samples=1, epsilon=0.2)
    rollout = agrpo.generate(model, *prompt(1), args, torch.Generator().manual_seed(0))
    t0 = lambda rollout, L, args, generator=None: (torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1))
    agrpo.revealed_logprobs(model, rollout, torch.zeros(1, dtype=torch.long), args)[0].sum().backward()
    grad_logp = flat_grad(model)
    position = rollout.positions[0, 0, 0]
    for advantage, ratio, clipped in [(1.0, 1.5, True), (1.0, 0.5, False), (-1.0, 1.5, False), (-1.0, 0.5, True),
                                      (1.0, 1.1, False), (-1.0, 0.9, False)]:
        shifted = dataclasses.replace(rollout, logp=rollout.logp.clone())
        shifted.logp[0, position] -= math.log(ratio)  # pi_old as if the policy had moved by this ratio
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(agrpo, "sample_timesteps", t0)
            agrpo_backward(model, shifted, torch.tensor([advantage]), args)
        expected = torch.zeros_like(grad_logp) if clipped else -advantage * ratio * grad_logp
        assert torch.allclose(flat_grad(model), expected, atol=1e-6), (advantage, ratio)


def test_kl_term_gradient_is_the_gradient_of_the_kl_to_the_reference():
    """With beta > 0 and zero advantages, the expected gradient over the token drawn from pi_old = pi at a
    revealed position is beta grad KL(pi || ref), the reference being the model with its adapters off: the k3
    estimate times the ratio r (without r it would be biased). The expectation is an exact sum over tokens."""
    model = tiny_model(seed=6)
    args = toy_args(completion_length=1, block_length=1, sampling_steps=1, eos_token_id=99, group_size=1,
                    mc_samples=1, beta=0.5, lora_rank=2, lora_targets="query,value")
    agrpo.add_lora(model, args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    rollout = agrpo.generate(model, *prompt(1), args, torch.Generator().manual_seed(0))
    t = torch.zeros(1, dtype=torch.long)
    logits = model(input_ids=torch.tensor([[1, 2, MASK]])).logits[0, 2]
    with agrpo.adapters_off(model), torch.no_grad():
        ref = model(input_ids=torch.tensor([[1, 2, MASK]])).logits[0, 2].log_softmax(-1)
    logpi = logits.log_softmax(-1)
    (0.5 * (logpi.exp() * (logpi - ref)).sum()).backward()
    expected = flat_grad(model)
    mean = 0
    for v in range(4):
        rollout.tokens[0, 0] = v
        rollout.logp[0, 0] = agrpo.revealed_logprobs(model, rollout, t, args)[0].detach()
        agrpo_backward(model, rollout, torch.zeros(1), args, torch.Generator().manual_seed(0))
        mean = mean + logpi[v].exp().detach() * flat_grad(model)
    assert expected.norm() > 1e-3 and torch.allclose(mean, expected, atol=1e-6)


def test_all_eos_completion_contributes_nothing():
    """A completion of nothing but EOS has L = 0 and adds exactly nothing to the gradient (no crash)."""
    model, args = tiny_model(seed=0), toy_args(completion_length=3, block_length=3, sampling_steps=3)
    rollout = agrpo.generate(model, *prompt(2), args, torch.Generator().manual_seed(0))
    rollout.tokens[0] = EOS  # row 0: nothing but EOS, L = 0
    assert agrpo.trajectory_length(rollout, args)[0] == 0
    agrpo_backward(model, rows_of(rollout, slice(0, 1)), torch.tensor([1.0]), args, torch.Generator().manual_seed(0))
    assert flat_grad(model).abs().max() == 0


def test_group_advantages_are_centred_and_only_scaled_on_request():
    """A_i = R_i - mean of its group, exactly, by default (the authors'); --scale-rewards std divides by the
    group's standard deviation (GRPO's)."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0])
    assert agrpo.group_advantages(rewards, 4).tolist() == [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert Args().scale_rewards == "none"
    scaled = agrpo.group_advantages(rewards, 4, "std")
    assert torch.allclose(scaled[:4], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (2.160247 + 1e-4)) and not scaled[4:].any()


def test_defaults_are_the_authors_settings():
    """Every default of Args is the authors' setting for LLaDA-8B-Instruct (training and evaluation)."""
    a = Args()
    assert (a.model, a.dtype, a.mask_token_id, a.seed) == ("GSAI-ML/LLaDA-8B-Instruct", "bfloat16", 126336, 333)
    assert (a.lora_rank, a.lora_alpha, a.lora_dropout) == (64, 64.0, 0.0)
    assert a.lora_targets.split(",") == ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
    assert (a.learning_rate, a.adam_beta1, a.adam_beta2, a.weight_decay, a.max_grad_norm, a.warmup_ratio) == \
        (5e-6, 0.9, 0.99, 0.01, 1.0, 0.01)
    assert (a.prompts_per_step, a.group_size, a.num_iterations, a.update_schedule) == (16, 8, 1, "paper")
    assert (a.completion_length, a.block_length, a.sampling_steps, a.unmasking) == (384, 12, 128, "random")
    assert (a.temperature, a.top_p, a.top_k) == (0.6, 0.99, 150)
    assert (a.mc_samples, a.low_discrepancy, a.importance_sampling, a.epsilon, a.beta) == \
        (24, True, "entropy", 0.2, 0.0)
    assert (a.eval_completion_length, a.eval_block_length, a.eval_sampling_steps, a.eval_unmasking,
            a.eval_temperature) == (256, 32, "128", "low_confidence", 0.0)


def test_top_p_alone_keeps_only_the_widest_nucleus(toy):
    """With top-k off and top-p on, the candidates kept are as many as the widest nucleus in the batch, never
    the vocabulary; a rollout's support is that wide and the trainer's log-probs under it equal the sampler's."""
    probs = torch.zeros(2, 1000)  # cumulative masses .5 .8 1 and .3 .52 .7 .82 .92 1: nuclei of 2 and 4 at .85
    probs[0, [7, 3, 9]] = torch.tensor([0.5, 0.3, 0.2])
    probs[1, :6] = torch.tensor([0.3, 0.22, 0.18, 0.12, 0.1, 0.08])
    z, ids, size = agrpo.truncated_logits(probs.log(), Args(temperature=1.0, top_k=0, top_p=0.85))
    assert size.tolist() == [2, 4] and ids[0, :3].tolist() == [7, 3, 9] and ids[1].tolist() == [0, 1, 2, 3]
    assert z[0, 2:].eq(-math.inf).all() and z[1].isfinite().all()
    model, tokenizer = toy
    args = toy_run_args(tokenizer, top_k=0, top_p=0.9)
    rollout = agrpo.generate(model, *toy_prompts(tokenizer), args, torch.Generator().manual_seed(0))
    assert rollout.support_size.max() <= rollout.support.shape[-1] < model.config.vocab_size
    for t in range(args.sampling_steps):
        logp, pos = agrpo.revealed_logprobs(model, rollout, torch.full((2,), t), args)
        assert torch.allclose(logp, rollout.logp.gather(1, pos), atol=1e-5), t


def masks_seen(model):
    """Record, for every forward of `model`, whether it was given an attention mask."""
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, a, kw: seen.append(kw.get("attention_mask") is not None), with_kwargs=True)
    return seen, handle


def test_attention_mask_only_for_padded_prompts(toy):
    """Unpadded prompts (a training micro-batch is one prompt group) give every forward attention_mask=None,
    in generation and in training; a padded batch still gets its mask."""
    model, tokenizer = toy
    args = toy_run_args(tokenizer)
    seen, handle = masks_seen(model)
    try:
        for texts, padded in ((["12+7=", "12+7="], False), (["12+7=", "a longer prompt: 3*4"], True)):
            seen.clear()
            rollout = agrpo.generate(model, *toy_prompts(tokenizer, texts), args, torch.Generator().manual_seed(0))
            agrpo_backward(model, rollout, torch.tensor([1.0, -1.0]), args, torch.Generator().manual_seed(1))
            model.zero_grad(set_to_none=True)
            assert len(seen) == args.sampling_steps + args.mc_samples and set(seen) == {padded}
    finally:
        handle.remove()


def test_evaluation_batches_prompts_of_similar_length(toy, tmp_path):
    """Evaluation sorts prompts by length before batching: two short and two long questions, interleaved, make
    two unpadded batches (no mask), and the rows come back in the test set's order."""
    model, tokenizer = toy
    questions = ["Target: 1", "Target: 1 and a much longer question", "Target: 2",
                 "Target: 2 and a much longer question"]
    examples = [{"question": q, "nums": [1, 2, 3], "target": 6} for q in questions]
    args = toy_run_args(tokenizer, eval_batch_size=2, eval_completion_length=8, eval_block_length=8,
                        eval_sampling_steps="4", output_dir=str(tmp_path))
    seen, handle = masks_seen(model)
    try:
        agrpo.evaluate(model, tokenizer, examples, args, 0)
    finally:
        handle.remove()
    assert len(seen) == 2 * 4 and not any(seen)
    rows = [json.loads(line) for line in open(tmp_path / "eval-step0-T4.jsonl")]
    assert [r["question"] for r in rows] == questions


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that records the learning rate of every update it takes; `latest` is the newest one made."""
    latest = None

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lrs = []
        RecordingAdamW.latest = self

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        return super().step(closure)


def released_trainer_by_hand(model, optimizer, rollouts, advantages, args, step):
    """The released trainer's updates written plainly, as its 8 processes x 2 micro-batches ran: accumulate the
    even micro-batches, then, for each sampled step m, the odd micro-batches' backward passes of m and an
    optimizer update, each clipped."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    G = args.group_size
    for i in range(0, len(rollouts), 2):
        agrpo_backward(model, rollouts[i], advantages[i * G:(i + 1) * G], args,
                       agrpo.stream(args, "timesteps", step, 0, i))
    draws = {i: agrpo.sample_timesteps(rollouts[i], agrpo.trajectory_length(rollouts[i], args), args,
                                       agrpo.stream(args, "timesteps", step, 0, i)) for i in range(1, len(rollouts), 2)}
    for m in range(args.mc_samples):
        for i, (t, weight) in draws.items():
            rollout, adv = rollouts[i], advantages[i * G:(i + 1) * G][:, None]
            logp, pos = agrpo.revealed_logprobs(model, rollout, t[:, m], args)
            ratio = (logp - rollout.logp.gather(1, pos)).exp()
            term = -torch.min(ratio * adv, ratio.clamp(1 - args.epsilon, 1 + args.epsilon) * adv)
            ((term * weight[:, m, None]).sum() / (args.prompts_per_step * args.mc_samples * G)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_released_schedule_updates_after_each_sampled_step(toy, monkeypatch):
    """--update-schedule released takes M optimizer updates per step, all at one learning rate (the paper's
    schedule takes one), and its weights equal those of the plain loop above fed the same draws."""
    monkeypatch.setattr(reward, "reward_parts", count_1)
    _, tokenizer = toy
    examples = [{"question": q} for q in ("12+7=", "3*4=", "8-5=", "9*9=")]
    args = toy_run_args(tokenizer, group_size=2, micro_batch_size=2, prompts_per_step=4, mc_samples=3, top_k=0,
                        top_p=1.0, temperature=1.0, max_grad_norm=0.05, update_schedule="released")
    start = agrpo.toy_model_and_tokenizer(seed=0)[0]
    results = {}
    for schedule in ("paper", "released", "by hand"):
        model = copy.deepcopy(start)
        optimizer = RecordingAdamW(model.parameters(), lr=1e-2)
        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
        if schedule == "by hand":
            rollouts = [agrpo.generate(model.eval(), *agrpo.tokenize_prompts(tokenizer, [ex, ex], args), args,
                                       agrpo.stream(args, "rollout", 1, i)) for i, ex in enumerate(examples)]
            texts = tokenizer.batch_decode(torch.cat([r.tokens for r in rollouts]), skip_special_tokens=True)
            rewards = torch.tensor([count_1("", text, {})["correct"] for text in texts])
            model.train()
            released_trainer_by_hand(model, optimizer, rollouts, agrpo.group_advantages(rewards, 2), args, 1)
        else:
            agrpo.rl_step(model, tokenizer, optimizer, cosine, examples,
                          dataclasses.replace(args, update_schedule=schedule), 1)
        results[schedule] = (optimizer.lrs, dict(model.named_parameters()))
    assert results["paper"][0] == [1e-2] and results["released"][0] == [1e-2] * 3
    hand, released, paper = (results[k][1] for k in ("by hand", "released", "paper"))
    assert all(torch.allclose(hand[k], released[k], atol=1e-6) for k in hand)
    assert any(not torch.allclose(paper[k], released[k], atol=1e-4) for k in hand)


# ------------------------------------------------------------------------------------------------------------
# 4. Rewards (reward.py): real LLaDA answers as a careful human grades them, each grading rule, malformed and
#    hostile answers; prompts; the offline data generators and the hub loaders
_CD = {"question": "Target: 23\nNumbers: [30, 100, 93]", "nums": [30, 100, 93], "target": 23}
_GSM = {"question": "How many?", "answer": "18"}
_MATH = {"question": "Half of one?", "answer": "\\frac{1}{2}"}
_SUDOKU = {"question": "Puzzle: 0310200404001043", "puzzle": "0310200404001043",
           "answer": "4312213434211243"}
_EXAMPLES = {"countdown": _CD, "gsm8k": _GSM, "math500": _MATH, "sudoku": _SUDOKU}


def _wrap(answer, think=True):
    return ("<think>reasoning</think>\n" if think else "") + f"<answer>{answer}</answer>"


def _parts(task, completion, example=None):
    p = reward.reward_parts(task, completion, example or _EXAMPLES[task])
    return p["format"], p["correct"]


def _cd(nums, target):
    return {"question": "", "nums": nums, "target": target}


def _sudoku(puzzle, answer):
    return {"question": "", "puzzle": puzzle, "answer": answer}


# The answer-bearing tails (last lines) of real LLaDA-8B-Instruct completions: d1's published baseline
# generations at length 128, answering d1's prompt (<reasoning> tags, then <answer>\boxed{...}</answer>),
# each with its line in the generation file and the score a careful human grader gives it.
_REAL = [  # (task, line, example, tail, human score)
    # countdown: the expression alone, boxed or bare, or "= target"; each given number exactly once
    ("countdown", 2, _cd([60, 85, 87], 62), "</reasoning>\n<answer>\n\\boxed{87 - 85 + 60}\n</answer>", 1),
    ("countdown", 193, _cd([48, 96, 26], 74), "</reasoning>\n<answer>\n96 - 48  + 26\n</answer>", 1),
    ("countdown", 211, _cd([90, 22, 61], 7), "</reasoning>\n<answer>\n\\boxed{90 - 22 - 61 = 7}\n</answer>", 1),
    ("countdown", 100, _cd([24, 24, 34], 34), "</reasoning>\n<<answer>\n\\boxed{34 - 24 + 24}\n</answer>", 1),
    ("countdown", 217, _cd([74, 56, 53], 71), "</reasoning>\n\n\\boxed{(74 - 56) + 53}", 1),  # no tags
    ("countdown", 207, _cd([27, 83, 91], 35), "</reasoning>\n\n<>\n\\boxed{91 - 83 + 27}", 1),
    ("countdown", 56, _cd([28, 5, 11], 34), "</reasoning>\n<answer>\n\\boxed{28 + (11 - 5}\n</answer>", 1),
    ("countdown", 97, _cd([61, 60, 4], 3), "</reasoning>\n\\boxed{61 - 60 - 4}", 0),  # -3
    ("countdown", 138, _cd([48, 29, 16], 93), "</reasoning>\n<answer> \\boxed{48 + 29 - 16}", 0),
    ("countdown", 0, _cd([49, 55, 53], 51), "</reasoning>\n<answer>\n\\boxed{55 - 53}\n</answer>", 0),
    ("countdown", 15, _cd([51, 60, 99], 11), "</reasoning>\n<answer>\n\\boxed{99 - 60 - 60}\n</answer>", 0),
    ("countdown", 118, _cd([43, 58, 61], 46),
     "</reasoning>\n<answer>\n\\boxed{(43 + 58) - 61 + 46 = 46}\n</answer>", 0),  # 46 is not given
    ("countdown", 48, _cd([15, 78, 62], 1),
     "</reasoning>\n<answer>\n\\boxed{\\frac{15}{78} \\times 62}\n</answer>", 0),  # 155/13
    ("countdown", 233, _cd([14, 32, 7], 39),
     "</reasoning>\n<answer>\n\\boxed{14 + \\frac{32}{14} + 7}\n</answer>", 0),  # 14 twice
    ("countdown", 66, _cd([79, 80, 47], 48), "</reasoning>\n<answer>\nboxed{80 - 32}\n</answer>", 0),
    ("countdown", 36, _cd([64, 27, 74], 37), "</reasoning>\n<answer>\n\\boxed{}\n\\boxed{2}\n</answer>", 0),
    # gsm8k: where the final answer is, and its value
    ("gsm8k", 2, {"answer": "60"}, "= 60%.\n\\boxed{60\\%}\n</answer>", 1),  # no <answer> opened
    ("gsm8k", 3, {"answer": "6"}, "= 6 miles per hour.\n</answer>\n\\boxed{6}", 1),  # boxed after the tags
    ("gsm8k", 9, {"answer": "36"}, "</reasoning>\n<answer>\n\\boxed{36>", 1),  # box and block left open
    ("gsm8k", 52, {"answer": "20"}, "</reasoning>\n<answer>\n\\boxed{20} minutes early", 1),
    ("gsm8k", 197, {"answer": "70"}, "18 = 70\n</answer>\n<answer>\n\\boxed{70}", 1),
    ("gsm8k", 64, {"answer": "18"}, "= 18 \\) cookies.\n</reasoning>\n\n<>\n\\boxed{18}\n>", 1),
    ("gsm8k", 143, {"answer": "1125"}, "5168 - 4043 = 1125\n</reasoning>\n\nAnswer: \\boxed{1125}", 1),
    ("gsm8k", 76, {"answer": "10"}, "after 3 weeks is \\(\\boxed{10}\\) inches.", 1),
    ("gsm8k", 582, {"answer": "4"}, "</reasoning>\n<answer>\nboxed{4}\n</answer>", 1),  # no backslash
    ("gsm8k", 36, {"answer": "400"}, "\n\n<answer>\n$400\n</answer>", 1),  # no box
    ("gsm8k", 35, {"answer": "45"}, "</reasoning>\n<answer>\n\\boxed{45.0}", 1),
    ("gsm8k", 343, {"answer": "240"}, "</reasoning>\n\\boxed{240 sheets per month}", 1),
    ("gsm8k", 784, {"answer": "101"}, "</reasoning>\n<answer>\n\\boxed{}101\n</answer>", 1),  # empty box
    ("gsm8k", 79, {"answer": "79"}, "The total distance they biked is 54 + 25 = 79 miles.\n</answer>", 0),
    ("gsm8k", 898, {"answer": "1110"}, "</reasoning>\n<answer>\n\\boxed{1}110.", 0),  # the box holds 1
    ("gsm8k", 349, {"answer": "15"},
     "<answer>\n\\[\n90 - 105 = -15 \\text{ dollars}\n\\]\n\\boxed{-15}\n</answer>", 0),
    ("gsm8k", 946, {"answer": "880"}, "180 + 300 + 400 = 880.\n</answer>\\boxed{888}", 0),
    # math500: equal values in other spellings
    ("math500", 73, {"answer": "x=5"}, "</reasoning>\n<answer>\n\\boxed{5}\n</answer>", 1),
    ("math500", 414, {"answer": "x \\in [-2,7]"}, "</reasoning>\n<answer>\n\\boxed{[-2, 7]}\n</answer>", 1),
    ("math500", 312, {"answer": "\\text{(C)}"}, "</reasoning>\n<answer>\n\\boxed{C}\n</answer>\n", 1),
    ("math500", 131, {"answer": "31"}, "<answer>\n\\boxed{8 + 8 + 15 = 31 units}\n</answer>", 1),
    ("math500", 183, {"answer": "180^\\circ"}, "</reasoning>\n<answer>\n\\boxed{180}\n</answer>", 1),
    ("math500", 238, {"answer": "58,500"}, "</reasoning>\n<answer>\n\\boxed{58500}", 1),
    ("math500", 351, {"answer": "\\frac{4}{9}"}, "</reasoning>\n<answer>\n\\boxed{8/18}\n</answer>", 1),
    ("math500", 46, {"answer": "\\frac14"}, "</reasoning>\n<answer>\n\\boxed{0.25}", 1),
    ("math500", 72, {"answer": "\\frac{1}{8}"}, "</,ing>\n<answer>\n\\boxed{\\frac{3}{24}}\n</answer>", 1),
    ("math500", 247, {"answer": "2516_8"}, "</reasoning>\n<answer>\n\\boxed{2516}\n</answer>", 1),
    ("math500", 232, {"answer": "\\frac 59"}, "</reasoning>\n\\boxed{\\frac{5}{9}}\n```", 1),
    ("math500", 249, {"answer": "(-\\infty, 2) \\cup (3, \\infty)"},
     "</reasoning>\n<answer>\n\\boxed{(-\\infty, 2)\\cup(3, \\infty)}\n</answer>", 1),
    ("math500", 297, {"answer": "6r^2-4r-24"}, "</reasoning>\n<answer is \\boxed{6r^2 - 4r - 24}", 1),
    ("math500", 202, {"answer": "\\$36"}, "</reasoning>\n<answer>\n\\boxed{36.00}\n</answer>", 1),
    ("math500", 343, {"answer": "10"}, "</reasoning>\n<answer>\n\\boxed{10\\%}\n</answer>", 1),
    ("math500", 406, {"answer": "23"}, "</reasoning>\n\\boxed{23>", 1),
    ("math500", 2, {"answer": "40"}, "</reasoning>\n<answer>\n\\boxed{4{10}}\n</answer>", 0),  # renders 410
    ("math500", 128, {"answer": "\\frac{\\sqrt{3}}{3}"},
     "</reasoning>\n<answer>\n\\boxed{\\sqrt{3}}\n</answer>", 0),
    ("math500", 88, {"answer": "1+2i"}, "</reasoning>\n<answer>\n\\boxed{1-2i}\n</answer>", 0),
    ("math500", 92, {"answer": "y = 2x + 3"}, "</reasoning>\n<answer>\n\\boxed{y = 2x + b}\n</answer>", 0),
    ("math500", 111, {"answer": "3, 5, 7"}, "</reasoning>\n<answer>\n\\boxed{5}\n</answer>", 0),
    ("math500", 53, {"answer": "5.4 \\text{ cents}"}, "</reasoning>\n<answer>\n\\boxed{10.7}\n</answer>", 0),
    ("math500", 362, {"answer": "(1,-16,-4,43)"}, "</reasoning>\n<answer>\n\\boxed{(-1,16,-4)}\n</answer>", 0),
    ("math500", 188, {"answer": "3R^2"}, "<answer>\n\\boxed{AF^2 + BF^2 + CF^2 = R^2\n</answer>", 0),
    # sudoku: the share of empty cells solved, only for a whole 16-digit grid
    ("sudoku", 1, _sudoku("0204032001400402", "1234432121433412"),
     "</reasoning>\n<answer>\n1234432121433412\n</answer>", 1),
    ("sudoku", 3, _sudoku("2030042043101000", "2134342143121243"),
     "</reasoning>\n<answer>\n1324342343121212\n</answer>", 0.5),
    ("sudoku", 61, _sudoku("4300014030010230", "4312214334211234"),
     "</reasoning>\n<answer>\n43000140\n30010230\n</answer>", 0),  # the puzzle, copied
    ("sudoku", 6, _sudoku("1002031030004023", "1432231432414123"),
     "</reasoning>\n<answer>\n10020\n31030\n04023\n</answer>", 0),  # 15 digits
    ("sudoku", 26, _sudoku("3200000223011400", "3214413223411423"),
     "</reasoning>\n<answer>\n13200000223011400\n</answer>", 0),  # 17 digits
    ("sudoku", 69, _sudoku("0043400130020130", "1243432134122134"),
     "</reasoning>\n<answer>\n1234\\\n4213\\\n2313\n</answer>", 0),
    ("sudoku", 95, _sudoku("0100301010022340", "4123321414322341"),
     "</reasoning>\n<answer>\n1331124\n</answer", 0),
]


@pytest.mark.parametrize("task,line,example,tail,human", _REAL, ids=[f"{r[0]}:{r[1]}" for r in _REAL])
def test_reward_grades_real_llada_answers_as_a_careful_human(task, line, example, tail, human):
    """is_correct gives each real LLaDA answer the score a careful human grader gives it."""
    assert reward.is_correct(task, tail, dict(example, question="")) == pytest.approx(human)


@pytest.mark.parametrize("task,answer", [
    ("countdown", "93 - 100 + 30 = 23"), ("gsm8k", "\\boxed{18}"),
    ("math500", "\\boxed{\\dfrac{1}{2}}"), ("sudoku", "4312213434211243")])
def test_reward_correct_answer_gets_full_reward(task, answer):
    """An answer in the asked format earns the whole reward, 4: format 1 plus correctness 3."""
    ex = _EXAMPLES[task]
    assert reward.reward(task, _wrap(answer), ex) == pytest.approx(4.0)
    assert reward.is_correct(task, _wrap(answer), ex) == 1.0
    assert _parts(task, _wrap(answer)) == pytest.approx((1.0, 3.0))


def test_reward_countdown_format_and_correctness():
    """Countdown format: 1/3 per check of `expression = target`; correctness: exact value, given numbers."""
    assert _parts("countdown", _wrap("100 - 93 + 30 = 23")) == pytest.approx((1.0, 0.0))  # = 37
    assert reward.is_correct("countdown", _wrap("100 - 93 + 30 = 23"), _CD) == 0.0
    assert _parts("countdown", _wrap("100 - 30 = 23")) == pytest.approx((2 / 3, 0.0))
    assert _parts("countdown", _wrap("x = 7")) == (0.0, 0.0)
    assert _parts("countdown", _wrap("93 - 100 + 30")) == (0.0, 3.0)  # right, but not in the asked format
    assert _parts("countdown", _wrap("93 - 100 + 30 = 23 = 23")) == pytest.approx((0.5, 3.0))
    assert _parts("countdown", _wrap("-(100 - 93) + 30 = 23")) == pytest.approx((1.0, 3.0))
    assert _parts("countdown", _wrap("９３ - 100 + 30 = 23")) == pytest.approx((1 / 3, 0.0))
    assert _parts("countdown", _wrap("93 - 100 + 30 = ２３")) == pytest.approx((2 / 3, 0.0))
    # exact arithmetic: in floats 1 / 49 * 49 is 0.9999999999999999
    ex = _cd([1, 49, 49], 1)
    assert _parts("countdown", _wrap("1 / 49 * 49 = 1"), ex) == pytest.approx((1.0, 3.0))
    assert _parts("countdown", _wrap("(1/3)*3*49 = 1"), ex)[1] == 0.0  # wrong numbers
    ex = _cd([5, 5, 9], 9)
    assert _parts("countdown", _wrap("9 / (5 - 5) = 9"), ex) == pytest.approx((1.0, 0.0))
    assert _parts("countdown", _wrap("9 ** 5 - 5 = 9"), ex) == pytest.approx((1.0, 0.0))


def test_reward_countdown_reusing_a_number_is_wrong():
    """An expression that reaches the target only by using a given number twice earns no correctness."""
    assert reward.is_correct("countdown", _wrap("93 - 100 + 30 + 30 - 30 = 23"), _CD) == 0.0
    assert _parts("countdown", _wrap("\\boxed{93 - 100 + 30 + 30 - 30}"))[1] == 0.0


@pytest.mark.parametrize("example,answer,human", [
    (_CD, "\\boxed{93 - 100 + 30}", 1), (_CD, "\\boxed{(93 - 100) + 30 = 23}", 1),
    (_CD, "\\boxed{\\left(93 - 100\\right) + 30}", 1), (_CD, "$93 − 100 + 30$", 1),
    (_CD, "93 - 100 + 30 = -7 + 30 = 23", 1), (_CD, "\\boxed{93 - 100 + 30.}", 1),
    (_cd([7, 13, 50], 41), "\\boxed{7 \\times 13 - 50}", 1), (_cd([7, 13, 50], 41), "7 \\cdot 13 - 50 = 41", 1),
    (_cd([7, 13, 50], 41), "\\boxed{13 × 7 - 50}", 1), (_cd([4, 12, 20], 23), "\\boxed{20 + 12 \\div 4}", 1),
    (_cd([4, 12, 20], 23), "20 + 12 ÷ 4 = 23", 1), (_cd([4, 12, 20], 23), "\\boxed{\\frac{12}{4} + 20 = 23}", 1),
    (_cd([4, 12, 20], 23), "\\boxed{20 + \\dfrac{12}{4}}", 1),
    (_CD, "\\boxed{93 - 100 + 30 = 24}", 0), (_CD, "93 - 100 + 30 = 20 + 3 = 24", 0),
    (_CD, "\\boxed{\\frac{93}{1} - 100 + 30}", 0), (_CD, "\\boxed{93 - 100 + 3 * 10}", 0),
    (_cd([4, 12, 20], 23), "\\boxed{20 + \\frac{12}}", 0), (_CD, "\\boxed{93 - 100 + 30 x}", 0),
])
def test_reward_countdown_reads_latex_and_unicode(example, answer, human):
    """Countdown correctness reads the bare expression, `= target`, LaTeX, Unicode and \\frac, still exactly."""
    assert reward.is_correct("countdown", _wrap(answer), example) == human


def test_reward_last_answer_block_is_graded():
    """Of several answer blocks, the last one is graded, whatever the case of its tags."""
    good, bad = _wrap("93 - 100 + 30 = 23"), "<answer>1 = 2</answer>"
    assert reward.reward("countdown", bad + good, _CD) == pytest.approx(4.0)
    assert reward.reward("countdown", good + bad, _CD) == pytest.approx(1 / 3)
    assert reward.reward("countdown", "<ANSWER>93 - 100 + 30 = 23</Answer>", _CD) == 4.0


@pytest.mark.parametrize("task", reward.TASKS)
def test_reward_format_is_strict_where_correctness_is_careful(task):
    """Format credit needs a closed answer block; correctness reads what a careful grader reads as the answer."""
    right = {"countdown": "93 - 100 + 30 = 23", "gsm8k": "\\boxed{18}",
             "math500": "\\boxed{\\frac{1}{2}}", "sudoku": "4312213434211243"}[task]
    boxed = task in ("gsm8k", "math500")  # a box is an answer even without tags
    think_only = 0.5 if boxed else 0.0
    cases = [("", 0, 0), (right, 0, boxed), ("<answer>" + right, 0, 1), (right + "</answer>", 0, boxed),
             ("<think>x</think><answer>" + right, think_only, 1), ("<answer>" + right + "<|eot_id|>", 0, 1)]
    for completion, fmt, correct in cases:
        assert _parts(task, completion) == pytest.approx((fmt, 3.0 * correct)), completion
    too_long = _wrap(right + " " * reward.MAX_ANSWER_CHARS + ".")
    assert _parts(task, too_long) == (think_only, 0.0)  # a block too long to read holds no answer


def test_reward_final_answer_is_where_a_careful_grader_finds_it():
    """The answer is the last answer block (closed or open) and its last box, else the last non-empty box."""
    cases = [
        ("<answer>\\boxed{17}</answer> then \\boxed{18}", 0),  # a box after a closed block is not read
        ("<answer>the total is 18</answer>", 1), ("<answer>\\boxed{18}<|eot_id|>\\boxed{17}", 1),
        ("<answer>\\boxed{17} or rather \\boxed{18}</answer>", 1), ("<answer></answer>\\boxed{18}", 1),
        ("\\boxed{18} and later \\boxed{17}", 0), ("<answer>\\boxed{ }</answer> so \\boxed{18}", 1),
        ("<answer>\\boxed{\\boxed{18}}</answer>", 1), ("<answer>\\boxed{18", 1), ("<answer>\\boxed{1", 0),
        ("the answer is 18", 0), ("<answer>17</answer>\n<answer>\\boxed{18}", 1),
    ]
    for completion, human in cases:
        assert reward.is_correct("gsm8k", completion, _GSM) == human, completion


@pytest.mark.parametrize("task,reference,answer,human", [
    ("gsm8k", "18", "\\boxed{\\$18.00}", 1), ("gsm8k", "18", "\\boxed{18 dollars}", 1), ("gsm8k", "18", "18", 1),
    ("gsm8k", "18", "\\boxed{\\text{18 apples}}", 1), ("gsm8k", "18", "\\boxed{9 \\times 2 = 18}", 1),
    ("gsm8k", "1000", "\\boxed{1,000}", 1), ("gsm8k", "60", "\\boxed{60\\%}", 1),
    ("gsm8k", "255", "boxed{255}", 1), ("gsm8k", "18", "\\boxed{in 2 weeks: 18 eggs}", 1),
    ("gsm8k", "18", "\\boxed{17}", 0), ("gsm8k", "18", "\\boxed{18.5}", 0),
    ("math500", "\\frac{1}{2}", "\\boxed{0.5}", 1), ("math500", "\\frac{1}{2}", "\\boxed{\\frac12}", 1),
    ("math500", "\\frac{1}{2}", "\\boxed{1/2}", 1), ("math500", "\\frac{1}{2}", "$\\boxed{\\tfrac{1}{2}}$.", 1),
    ("math500", "\\frac9{19}", "\\boxed{\\dfrac{9}{19}}", 1), ("math500", "\\frac9{19}", "\\boxed{9/19}", 1),
    ("math500", "\\frac9{19}", "\\boxed{0.47}", 0), ("math500", "\\frac{1}{3}", "\\boxed{0.33}", 0),
    ("math500", "1\\frac{4}{5}", "\\boxed{\\frac{9}{5}}", 1), ("math500", "\\frac{1}{2}", "\\boxed{1/0}", 0),
    ("math500", "5", "\\boxed{x = 5}", 1), ("math500", "x=5", "\\boxed{x = 5}", 1),
    ("math500", "5", "\\boxed{5x}", 0),
    ("math500", "x \\in [-2,7]", "\\boxed{[-2,7]}", 1), ("math500", "x \\in [-2,7]", "\\boxed{(-2,7)}", 0),
    ("math500", "5.4 \\text{ cents}", "\\boxed{5.4}", 1),
    ("math500", "5.4 \\text{ cents}", "\\boxed{5.4 cents}", 1),
    ("math500", "15\\mbox{ cm}^2", "\\boxed{15}", 1), ("math500", "15\\mbox{ cm}^2", "\\boxed{15 cm^2}", 1),
    ("math500", "12", "\\boxed{12 cm}", 1), ("math500", "31", "\\boxed{31 \\text{ units}}", 1),
    ("math500", "\\frac{270}7\\text{ degrees}", "\\boxed{\\frac{270}{7}}", 1),
    ("math500", "\\text{(C)}", "\\boxed{\\text{(C)}}", 1), ("math500", "\\text{(C)}", "\\boxed{(C)}", 1),
    ("math500", "\\text{(C)}", "\\boxed{\\textbf{(C)}}", 1), ("math500", "\\text{(C)}", "\\boxed{B}", 0),
    ("math500", "4210_{5}", "\\boxed{4210_5}", 1), ("math500", "4210_{5}", "\\boxed{4211_5}", 0),
    ("math500", "3, 5, 7", "\\boxed{3, 7, 5}", 1), ("math500", "3, 5, 7", "\\boxed{\\{7, 3, 5\\}}", 1),
    ("math500", "3, 5, 7", "\\boxed{3, 5}", 0), ("math500", "3, 5, 7", "\\boxed{3, 5, 5}", 0),
    ("math500", "(15,-29)", "\\boxed{(15, -29)}", 1), ("math500", "(15,-29)", "\\boxed{(-29, 15)}", 0),
    ("math500", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3,\\frac{\\pi}{2})}", 1),
    ("math500", "\\frac{\\sqrt{3}}{3}", "\\boxed{\\sqrt{3}/3}", 1),
    ("math500", "\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{\\sqrt3}{3}}", 1),
    ("math500", "\\frac{\\sqrt{3}}{3}", "\\boxed{\\frac{1}{\\sqrt{3}}}", 1),
    ("math500", "\\frac{\\sqrt{3}}{3}", "\\boxed{0.577}", 0), ("math500", "11\\sqrt2", "\\boxed{\\sqrt{242}}", 1),
    ("math500", "15x - 80", "\\boxed{-80 + 15x}", 1), ("math500", "15x - 80", "\\boxed{15x + 80}", 0),
    ("math500", "\\$32,\\!348", "\\boxed{32348}", 1), ("math500", "11,\\! 111,\\! 111,\\! 100", "11111111100", 1),
    ("math500", "90^\\circ", "\\boxed{90^{\\circ}}", 1), ("math500", "\\text{Navin}", "\\boxed{Navin}", 1),
    ("math500", "\\text{even}", "\\boxed{\\text{odd}}", 0), ("math500", "\\frac{1}{2}", "\\boxed{}", 0),
])
def test_reward_math_equivalence(task, reference, answer, human):
    """GSM8K and MATH-500 answers count when a careful grader would call them equal to the reference."""
    assert reward.is_correct(task, _wrap(answer), {"answer": reference}) == human


def test_reward_sudoku_cells_only_for_a_whole_grid():
    """Sudoku correctness is the share of empty cells solved, and only a whole 16-digit grid earns any."""
    grid = "2314" + _SUDOKU["answer"][4:]  # cells 0 and 3 (both empty) swapped: row 1 becomes 2314
    assert _parts("sudoku", _wrap(grid)) == pytest.approx((1.0, 3.0 * 6 / 8))
    assert reward.is_correct("sudoku", _wrap(grid), _SUDOKU) == pytest.approx(6 / 8)
    assert _parts("sudoku", _wrap("1" + _SUDOKU["answer"][1:])) == (0.75, 3.0 * 7 / 8)
    assert _parts("sudoku", _wrap("4" + "3" * 15)) == (0.25, 3.0 * 3 / 8)  # breaks givens
    for spread in ("4312 2134\n3421 1243", "```\n4312\n2134\n3421\n1243\n```", "4|3|1|2\n2,1,3,4\n3421\n1243",
                   "+---+---+\n|43|12|\n|21|34|\n+---+---+\n|34|21|\n|12|43|\n+---+---+"):
        assert _parts("sudoku", _wrap(spread)) == (0.0, 3.0), spread  # read as a grid, not in the format
    for malformed in ("4312", "431221343421124", "43122134342112433", "４312213434211243",
                      "4312-2134-3421-1243", "R1: 4312 R2: 2134 R3: 3421 R4: 1243"):
        assert _parts("sudoku", _wrap(malformed))[1] == 0.0, malformed


def test_reward_parts_report_the_answer_judged_and_the_reference():
    """reward_parts names the answer it judged (short, None if none); reference() gives the audit's reference."""
    completion = "<think>x</think><answer>\n\\boxed{18 apples}\n</answer>"
    assert reward.reward_parts("gsm8k", completion, _GSM) == {"format": 1.0, "correct": 3.0, "answer": "18 apples"}
    assert reward.reward_parts("gsm8k", "no answer", _GSM)["answer"] is None
    assert len(reward.reward_parts("gsm8k", "<answer>" + "7" * 900 + "</answer>", _GSM)["answer"]) <= 200
    assert reward.reference("countdown", _CD) == "23 from [30, 100, 93]"
    assert reward.reference("gsm8k", _GSM) == "18" and reward.reference("math500", _MATH) == "\\frac{1}{2}"
    assert reward.reference("sudoku", _SUDOKU) == _SUDOKU["answer"]


def test_reward_unknown_task_raises():
    """Every entry point refuses an unknown task, naming the known ones."""
    for call in (lambda: reward.reward("chess", "", {}), lambda: reward.is_correct("x", "", {}),
                 lambda: reward.prompt_messages("x", {}), lambda: reward.reference("x", {}),
                 lambda: reward.load_examples("x", "test", "synthetic")):
        with pytest.raises(ValueError, match="countdown, gsm8k, math500, sudoku"):
            call()


_HOSTILE = [
    "<answer>" + "(" * 10000 + "1" + ")" * 10000 + " = 5</answer>",
    "<answer>" + "(" * 95 + "30+100-93" + ")" * 95 + " = 37</answer>",
    "x" * 1_000_000 + "<answer>100 - 93 + 30 = 23</answer>",
    "<answer>" * 200_000, "</answer>" * 200_000, "<think>" * 200_000,
    "<answer>" + "1" * 1_000_000 + "</answer>",
    "<answer>2**99999 = 5</answer>", "<answer>9**9**9**9 = 5</answer>",
    "<answer>__import__('os').system('x') = 23</answer>",
    "<answer>f(30)+g.h[100]-93 = 23</answer>", "<answer>lambda: 30 = 23</answer>",
    "<answer>３０ + １００ - ９３ = 23</answer>",
    "<answer>٣٠ + ١٠٠ - ٩٣ = ٢٣</answer>",
    "<answer>" + "9" * 500 + " - " + "9" * 500 + " = 0</answer>",
    "<answer>9/0 = 23</answer>", "<answer>30/(100-100)*93 = 23</answer>",
    "<answer>" + "-" * 151 + "(93 - 100 + 30) = 23</answer>",
    "<answer>\\boxed{" * 10000 + "18" + "}" * 10000 + "</answer>",
    "<answer>" + "\\boxed{" * 100 + "18</answer>",
    "<answer>\\boxed{1e999999}</answer>", "<answer>\\boxed{" + "9" * 5000 + "}</answer>",
    "<answer>\\boxed{" + "1" * 40 + "/" + "3" * 40 + "}</answer>",
    "<answer>\0\0\0\0</answer>\0", "<answer>12\x003\x00 = 23</answer>",
    "\ud800<answer>\udfff</answer>",
    "<answer>" + "=" * 999 + "</answer>", "<answer>" + "(" * 199 + "</answer>",
    "<answer>" + "İ" * 5000 + "</answer>",
    # the careful reading: open blocks and boxes, LaTeX arithmetic, units, lists, fractions
    "<answer>" + "x" * 30000, "\\boxed{" + "{" * 30000, "<answer>" + "boxed{}" * 3000 + "</answer>",
    "<answer>" + "<|eot_id|>" * 2000, "<answer>\\boxed{" + "(" * 150 + "1" + ")" * 150 + "}</answer>",
    "<answer>\\boxed{" + "9^{" * 60 + "9" + "}" * 60 + "}</answer>", "<answer>\\boxed{9^{99}^{99}}</answer>",
    "<answer>\\boxed{1" + " ab" * 300 + "!}</answer>", "<answer>\\boxed{" + "1," * 490 + "1}</answer>",
    "<answer>" + "\\frac{" * 160 + "</answer>", "<answer>" + "\\frac(1)(" * 20 + "</answer>",
    "<answer>\\boxed{" + "\\sqrt" * 190 + "}</answer>", "<answer>\\boxed{" + "\\frac{1}{" * 100 + "}</answer>",
    "<answer>\\boxed{" + "9" * 400 + "\\pi}</answer>", "<answer>\\boxed{\\sqrt{-1}}</answer>",
    "<answer>\\boxed{(" + "1," * 300 + "1)}</answer>", "<answer>\\boxed{\\{" + "x," * 300 + "x\\}}</answer>",
    "<answer>\\boxed{" + "x" * 190 + "}</answer>", "<answer>\\boxed{" + "\\text{" * 300 + "}</answer>",
]


def test_reward_hostile_completions_are_fast_finite_and_wrong():
    """Hostile completions score a finite float, in under 10 ms, and are never correct."""
    # sudoku: the empty cells all hold a 4 and no hostile text contains an ASCII 4
    only_fours = dict(_SUDOKU, puzzle=_SUDOKU["answer"].replace("4", "0"))
    assert "4" not in "".join(_HOSTILE)
    worst = 0.0
    for task, ex in dict(_EXAMPLES, sudoku=only_fours).items():
        for completion in _HOSTILE:
            for score in (reward.reward, reward.is_correct):
                elapsed = []
                for _ in range(3):  # the least of three runs: the call's cost, not the scheduler's
                    start = time.perf_counter()
                    value = score(task, completion, ex)
                    elapsed.append(time.perf_counter() - start)
                worst = max(worst, min(elapsed))
                assert isinstance(value, float) and math.isfinite(value)
            assert reward.is_correct(task, completion, ex) == 0.0, (task, completion[:60])
    print(f"slowest hostile call: {worst * 1000:.2f} ms")
    assert worst < 0.01


def test_reward_fuzz_never_raises():
    """Random text made of the graders' own tokens never raises and stays within the reward's range."""
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<think>", "</think>", "=", "(", ")", "+", "-", "*",
              "/", "**", " ", "\\boxed{", "}", "{", "0", "1", "23", "93", "100", "30", "٣",
              "\0", "\\frac", "$", ",", ".", "e9", "x", "\n", "\\sqrt", "^", "\\{", "\\}", "[", "]",
              "\\pi", "\\times", "÷", "\\text{", " cm", "_", "\\in", "<|eot_id|>", "|", "---"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for task, ex in _EXAMPLES.items():
            value = reward.reward(task, text, ex)
            assert math.isfinite(value) and -0.5 <= value <= 4.0


def test_reward_prompts_state_the_format_with_worked_examples():
    """Each system prompt states the answer format and shows worked examples that the graders score 4."""
    for task, ex in _EXAMPLES.items():
        system, user = reward.prompt_messages(task, ex)
        assert (system["role"], user["role"]) == ("system", "user")
        assert user["content"] == ex["question"]
        assert "<think>" in system["content"] and "<answer>" in system["content"]
    assert "\\boxed{}" in reward.prompt_messages("math500", _MATH)[0]["content"]
    assert "expression = target" in reward.prompt_messages("countdown", _CD)[0]["content"]
    assert "16 digits" in reward.prompt_messages("sudoku", _SUDOKU)[0]["content"]
    countdown, math_prompt = reward.SYSTEM_PROMPTS["countdown"], reward.SYSTEM_PROMPTS["gsm8k"]
    assert reward.reward("countdown", countdown[countdown.rindex("<think>"):], _cd([7, 13, 50], 41)) == 4.0
    assert reward.reward("gsm8k", math_prompt[math_prompt.rindex("<think>"):], {"answer": "19"}) == 4.0
    worked = reward.SYSTEM_PROMPTS["sudoku"].split("Puzzle: ")[1:]
    synthetic_test = {e["puzzle"] for e in reward.load_examples("sudoku", "test", "synthetic")}
    assert len(worked) == 3
    for text in worked:  # not a test puzzle; its answer earns the whole reward
        puzzle, grid = text[:16], text.split("<answer>\n")[1][:16]
        assert puzzle not in synthetic_test
        assert reward.reward("sudoku", text[text.index("<think>"):], _sudoku(puzzle, grid)) == 4.0


def _worked_sudoku(puzzle):
    """A puzzle filled up one forced cell at a time (a cell whose row, column and box hold the three other
    digits), written out step by step as in the sudoku prompt; None if it gets stuck."""
    cells, steps = [int(c) for c in puzzle], []
    for _ in range(puzzle.count("0")):
        seen = {i: sorted({cells[j] for j in reward._PEERS[i]} - {0}) for i in range(16) if cells[i] == 0}
        i = next((i for i, held in seen.items() if len(held) == 3), None)
        if i is None:
            return None
        cells[i] = 10 - sum(seen[i])  # 1 + 2 + 3 + 4 = 10
        steps.append(f"R{i // 4 + 1}C{i % 4 + 1}: its row, column and box hold "
                     f"{seen[i][0]}, {seen[i][1]} and {seen[i][2]}, so {cells[i]}.")
    rows = " ".join(puzzle[r:r + 4] for r in range(0, 16, 4))
    return (f"Puzzle: {puzzle}\n<think>\nRows: {rows}.\n" + "\n".join(steps)
            + f"\n</think>\n<answer>\n{''.join(map(str, cells))}\n</answer>")


def test_reward_sudoku_prompt_examples_are_generated_and_solve_their_puzzles():
    """The worked examples written out in the sudoku prompt are the first three puzzles of the project's
    generator, on the prompt's seed, that forced cells fill up; each answer is its puzzle's only solution."""
    rng, worked = random.Random("sudoku/prompt"), []
    while len(worked) < 3:
        text = _worked_sudoku(reward._random_sudoku(rng)["puzzle"])
        worked += [text] if text else []
    assert reward.SYSTEM_PROMPTS["sudoku"].endswith("Three worked examples:\n\n" + "\n\n".join(worked))
    for text in worked:
        puzzle, grid = text[len("Puzzle: "):][:16], text.split("<answer>\n")[1][:16]
        assert reward.count_sudoku_solutions(puzzle) == 1
        assert reward.count_sudoku_solutions(grid) == 1 and all(p in ("0", g) for p, g in zip(puzzle, grid))


def test_prompts_visit_every_example_once_an_epoch_in_a_fresh_order():
    """The training stream visits all examples once per epoch, each epoch in its own seeded order."""
    examples = list(range(50))
    first, second = agrpo.prompts_at(examples, 333, 0, 50), agrpo.prompts_at(examples, 333, 50, 50)
    assert sorted(first) == sorted(second) == examples and first != second
    assert agrpo.prompts_at(examples, 333, 45, 10) == first[45:] + second[:5]


def test_data_solvers():
    """The brute-force checkers find countdown solutions and count sudoku solutions correctly."""
    assert reward.solve_countdown([30, 100, 93], 23) is not None
    assert reward.solve_countdown([1, 1, 1], 100) is None
    assert reward.count_sudoku_solutions("0" * 16, limit=1000) == 288  # all 4x4 grids
    assert reward.count_sudoku_solutions(_SUDOKU["puzzle"]) == 1
    assert reward.count_sudoku_solutions("11" + "0" * 14) == 0
    with pytest.raises(ValueError):
        reward.count_sudoku_solutions("5" * 16)


def test_data_synthetic_is_deterministic_and_disjoint():
    """Synthetic data is seeded: a fixed test set, a train stream that depends on the seed and avoids it."""
    for task in reward.SYNTHETIC_TASKS:
        test = reward.load_examples(task, "test", "synthetic")
        train = reward.load_examples(task, "train", "synthetic", n=300, seed=1)
        assert len(test) == 256 and len(train) == 300
        assert test == reward.load_examples(task, "test", "synthetic", seed=5)
        assert train == reward.load_examples(task, "train", "synthetic", n=300, seed=1)
        assert train != reward.load_examples(task, "train", "synthetic", n=300, seed=2)
        assert reward.load_examples(task, "train", "synthetic", n=10, seed=1) == train[:10]
        key = (lambda e: (tuple(sorted(e["nums"])), e["target"])) if task == "countdown" \
            else (lambda e: e["puzzle"])
        test_keys = {key(e) for e in test}
        assert len(test_keys) == 256 and not test_keys & {key(e) for e in train}


def test_data_synthetic_countdown_solvable():
    """Every generated countdown problem has a solution that earns the whole reward."""
    problems = reward.load_examples("countdown", "test", "synthetic") + \
        reward.load_examples("countdown", "train", "synthetic", n=100)
    for ex in problems:
        assert len(ex["nums"]) == 3 and all(1 <= n <= 100 for n in ex["nums"])
        assert isinstance(ex["target"], int) and 1 <= ex["target"] <= 1000
        expr = reward.solve_countdown(ex["nums"], ex["target"])
        assert expr is not None
        assert reward.reward("countdown", _wrap(f"{expr} = {ex['target']}"), ex) == 4.0
        assert ex["question"] == f"Target: {ex['target']}\nNumbers: {ex['nums']}"


def test_data_synthetic_sudoku_unique_and_consistent():
    """Every generated sudoku has exactly one solution, consistent with its givens."""
    units = [[r * 4 + c for c in range(4)] for r in range(4)] + \
        [[r * 4 + c for r in range(4)] for c in range(4)] + \
        [[r * 4 + c for r in rows for c in cols] for rows in ((0, 1), (2, 3))
         for cols in ((0, 1), (2, 3))]
    for ex in reward.load_examples("sudoku", "test", "synthetic"):
        puzzle, answer = ex["puzzle"], ex["answer"]
        assert reward.count_sudoku_solutions(puzzle) == 1
        assert all(p in ("0", a) for p, a in zip(puzzle, answer))
        assert all({answer[i] for i in unit} == set("1234") for unit in units)
        assert 6 <= puzzle.count("0") <= 12
        assert reward.reward("sudoku", _wrap(answer), ex) == 4.0


def test_data_synthetic_missing_for_math_tasks():
    """Asking for synthetic math data says that only countdown and sudoku have generators."""
    for task in ("gsm8k", "math500"):
        with pytest.raises(reward.DataUnavailable, match="only for countdown and sudoku"):
            reward.load_examples(task, "train", "synthetic")


def test_data_hub_without_datasets_library(monkeypatch):
    """Without the datasets library, hub data fails with DataUnavailable and a way out."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(reward.DataUnavailable, match="pass --data synthetic"):
        reward.load_examples("countdown", "test", "hub")


def _no_network(monkeypatch):
    """Simulates a machine without network: no host name resolves. Returns the names looked up."""
    lookups = []

    def getaddrinfo(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


@pytest.mark.parametrize("offline", ["no network", "offline mode"])
def test_data_hub_offline_fails_fast(monkeypatch, tmp_path, capfd, offline):
    """Offline, every hub data set fails at once, with one DataUnavailable sentence and nothing printed: with no
    network after one probe of its source, in datasets' offline mode without a probe."""
    datasets = pytest.importorskip("datasets")
    lookups = _no_network(monkeypatch)  # in offline mode too: no request leaves the machine
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    if offline == "offline mode":
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time
    capfd.readouterr()
    for task in reward.TASKS:
        for split in ("train", "test"):
            lookups.clear()
            start = time.perf_counter()
            with pytest.raises(reward.DataUnavailable) as error:
                reward.load_examples(task, split, "hub")
            assert time.perf_counter() - start < 2
            assert capfd.readouterr() == ("", "")
            message = str(error.value)
            assert "\n" not in message and re.fullmatch(
                r"could not load \S+ (from the Hugging Face Hub )?\(offline, and no usable copy in the local "
                r"cache\); check the network.*", message)
            assert len(lookups) <= 2  # no retries: the probe, and datasets resolving a URL


def test_data_hub_without_network_reads_the_local_cache(monkeypatch):
    """With no network, a hub data set is read from the local cache alone (datasets' offline mode, for the load)."""
    datasets = pytest.importorskip("datasets")
    _no_network(monkeypatch)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def load_dataset(path, **kwargs):  # a cached copy, found in offline mode only
        assert datasets.config.HF_HUB_OFFLINE
        return [{"question": "q", "answer": "work\n#### 5"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert reward.load_examples("gsm8k", "test", "hub") == [{"question": "q", "answer": "5"}]
    assert not datasets.config.HF_HUB_OFFLINE


def test_data_hub_rows_are_converted_and_test_problems_removed(monkeypatch):
    """Hub rows become example dicts, GSM8K is tested on platinum or openai, test problems leave train."""
    cd_train, sudoku_row = "Jiayi-Pan/Countdown-Tasks-3to4", {"Puzzle": 310200404001043,
                                                             "Solution": 4312213434211243}
    tables = {  # rows as `datasets` yields them; csv columns arrive as ints
        reward.CD3_TEST_URL: [{"input": "30,100,93", "output": "23"}],
        cd_train: [{"nums": [93, 30, 100], "target": 7}, {"nums": [1, 2, 3], "target": 6},
                   {"nums": [1, 2, 3, 4], "target": 10}],
        "openai/gsm8k": [{"question": "q", "answer": "work\n#### 1,000"}],
        "madrylab/gsm8k-platinum": [{"question": "qp", "answer": "fixed\n#### 7", "cleaning_status": "revised"}],
        "HuggingFaceH4/MATH-500": [{"problem": "p1", "answer": "5"}],
        "qwedsacf/competition_math": [
            {"problem": "p1", "level": "Level 1", "solution": "\\boxed{5}"},
            {"problem": "p2", "level": "Level 5", "solution": "\\boxed{2}"},
            {"problem": "p3", "level": "Level 2", "solution": "so \\boxed{\\frac{1}{2}}."},
            {"problem": "p4", "level": "Level ?", "solution": "\\boxed{1}"},
            {"problem": "p5", "level": "Level 3", "solution": "no box"}],
        reward.SUDOKU_URLS["train"]: [sudoku_row], reward.SUDOKU_URLS["test"]: [sudoku_row],
    }
    calls = []

    def load_dataset(path, name=None, data_files=None, split=None):
        calls.append((path, name, split))
        return tables[data_files or path]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=load_dataset, config=types.SimpleNamespace(HF_HUB_OFFLINE=False)))
    monkeypatch.setattr(reward, "_answers", lambda path, data_files: True)  # every source answers its probe
    load = reward.load_examples
    assert load("countdown", "test", "hub") == [
        {"question": "Target: 23\nNumbers: [30, 100, 93]", "nums": [30, 100, 93], "target": 23}]
    assert load("countdown", "train", "hub") == [
        {"question": "Target: 6\nNumbers: [1, 2, 3]", "nums": [1, 2, 3], "target": 6}]
    assert (cd_train, None, "train[:20000]") in calls
    assert load("gsm8k", "test", "hub") == [{"question": "qp", "answer": "7"}]
    assert ("madrylab/gsm8k-platinum", "main", "test") in calls
    assert load("gsm8k", "test", "hub", gsm8k_test="openai") == [{"question": "q", "answer": "1,000"}]
    assert ("openai/gsm8k", "main", "test") in calls
    assert load("gsm8k", "train", "hub", gsm8k_test="platinum") == [{"question": "q", "answer": "1,000"}]
    assert ("openai/gsm8k", "main", "train") in calls
    with pytest.raises(ValueError, match="platinum, openai"):
        load("gsm8k", "test", "hub", gsm8k_test="gold")
    assert load("math500", "test", "hub") == [{"question": "p1", "answer": "5"}]
    assert load("math500", "train", "hub") == [{"question": "p3", "answer": "\\frac{1}{2}"}]
    sudoku = {"question": "Puzzle: 0310200404001043", "puzzle": "0310200404001043",
              "answer": "4312213434211243"}
    assert load("sudoku", "train", "hub") == load("sudoku", "test", "hub", n=1) == [sudoku]


# ------------------------------------------------------------------------------------------------------------
# 5. End to end
def test_toy_model_learns_a_toy_reward():
    """Rewarding the number of token 1 in the completion: 40 AGRPO steps raise its share clearly. Each 5-step
    mean covers 480 tokens, so its standard error is about 0.02 and the margin 0.3 is over ten of them; the
    share starts near 1/4, so only learning can add 0.3."""
    model = tiny_model(seed=0, vocab=4)
    args = toy_args(completion_length=6, block_length=6, sampling_steps=6, group_size=4, mc_samples=2,
                    prompts_per_step=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(40):
        rollout = agrpo.generate(model, *prompt(4 * args.group_size), args, gen)
        rewards = (rollout.tokens == 1).float().mean(1)
        agrpo_backward(model, rollout, agrpo.group_advantages(rewards, args.group_size), args, gen)
        optimizer.step()
        optimizer.zero_grad()
        history.append(rewards.mean().item())
    before, after = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert after > before + 0.3, history


def test_warmed_up_toy_earns_more_reward_under_agrpo_and_not_without(tmp_path):
    """The toy's supervised warm-up (not AGRPO; here shorter, on smaller batches, than the default run's) gives
    the toy model a start that earns sudoku reward, cached on disk. AGRPO steps on one puzzle then raise the
    reward of the model's own samples; the same steps with learning rate 0 leave it flat."""
    args = agrpo.parse_args(["--task", "sudoku", "--model", "toy", "--toy-warmup-steps", "100", "--completion-length",
                             "18", "--block-length", "18", "--sampling-steps", "6", "--mc-samples", "6",
                             "--group-size", "16", "--micro-batch-size", "16", "--prompts-per-step", "1"])
    puzzle = reward.load_examples("sudoku", "train", "synthetic", n=1, seed=1)

    def rewards(lr):
        model, tokenizer = agrpo.toy_model_and_tokenizer(args.seed)
        args.eos_token_id = tokenizer.eos_token_id
        agrpo.warm_up_toy(model, tokenizer, args, batch=16)  # the first arm trains and caches, the second loads
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 4))
        return [float(agrpo.rl_step(model, tokenizer, optimizer, schedule, puzzle, args, step)["rewards"].mean())
                for step in range(1, 13)]

    def rise(r):
        return sum(r[6:]) / 6 - sum(r[:6]) / 6

    trained, frozen = rewards(1e-3), rewards(0.0)
    assert [f.endswith(".pt") for f in os.listdir(tmp_path / "cache" / "agrpo")] == [True]
    assert trained[0] == frozen[0] > 0.5  # the same warmed-up start, whose samples earn reward
    # With lr 0 the rewards are draws from one fixed policy and the rise (last 6 steps' mean minus the first 6's)
    # is sampling noise: over seeds 333, 1 and 2 it was -0.10 to -0.01, while AGRPO raised it by 0.15 to 0.35.
    assert rise(trained) > 0.1 > rise(frozen), (trained, frozen)


def test_toy_warm_up_answers_earn_the_full_reward():
    """The warm-up teaches the toy answers that reward.py grades in full: format and correctness."""
    for task in ("countdown", "sudoku"):
        for ex in reward.load_examples(task, "train", "synthetic", n=20, seed=5):
            answer = agrpo.toy_answer(task, ex)
            assert reward.reward_parts(task, answer, ex)["format"] == 1.0 and reward.is_correct(task, answer, ex) == 1


def test_main_runs_evaluates_logs_and_checkpoints(tmp_path, capsys):
    """A toy run evaluates at the start and the end, logs every metric the README lists (one line a step, and
    one an evaluation), writes auditable evaluation rows, a checkpoint, curves.svg, and says where they are."""
    out = str(tmp_path / "run")
    agrpo.main(["--task", "countdown", "--model", "toy", "--toy-warmup-steps", "0", "--max-steps", "2",
                "--eval-every", "2", "--eval-examples", "8", "--train-examples", "64", "--output-dir", out])
    lines = metric_lines(out)
    assert [(m["step"], "reward" in m) for m in lines] == [(0, False), (1, True), (2, True), (2, False)]
    for key in ("reward", "reward_format", "reward_correct", "accuracy", "reward_std", "zero_spread_groups",
                "advantage_abs", "advantage_min", "advantage_max", "completion_length", "loss", "clip_low",
                "clip_high", "kl", "ratio_max_dev", "grad_norm", "lr", "seconds_generate", "seconds_grade",
                "seconds_train", "tokens_per_second", "prompts_seen", "elapsed_seconds"):
        assert all(math.isfinite(m[key]) for m in lines[1:3]), key
    assert [m["prompts_seen"] for m in lines[1:3]] == [8, 16]
    assert lines[1]["tokens_per_second"] == pytest.approx(
        8 * 8 * 24 / sum(lines[1][f"seconds_{k}"] for k in ("generate", "grade", "train")))
    assert 0 <= lines[3]["eval_T12_accuracy"] <= 1 and lines[3]["eval_T12_seconds_per_completion"] > 0
    rows = [json.loads(line) for line in open(os.path.join(out, "eval-step2-T12.jsonl"))]
    assert len(rows) == 8 and [r["index"] for r in rows] == list(range(8))
    assert all(set(r) == {"index", "question", "reference", "answer", "score", "length", "completion"} for r in rows)
    assert agrpo.checkpoints(out) == [os.path.join(out, "checkpoint-2")]
    saved = json.load(open(os.path.join(out, "checkpoint-2", "args.json")))
    assert saved == json.load(open(os.path.join(out, "config.json"))) and saved["model"] == "toy"
    assert torch.load(os.path.join(out, "checkpoint-2", "state.pt"))["step"] == 2
    import xml.etree.ElementTree as ElementTree
    panels = ElementTree.parse(os.path.join(out, "curves.svg")).getroot().findall(".//{*}polyline")
    assert len(panels) == 4 and all(len(p.get("points").split()) == n for p, n in zip(panels, (2, 2, 2, 2)))
    printed = capsys.readouterr().out
    assert "step 0: evaluation accuracy" in printed and "step 2: evaluation accuracy" in printed
    assert f"; curves: {out}/curves.svg" in printed


def test_the_sudoku_toy_runs_a_step(tmp_path):
    """--task sudoku --model toy trains and evaluates (a solved grid fits the preset's completion length)."""
    out = str(tmp_path / "run")
    agrpo.main(["--task", "sudoku", "--model", "toy", "--toy-warmup-steps", "0", "--max-steps", "1", "--eval-every",
                "1", "--eval-examples", "4", "--train-examples", "16", "--output-dir", out])
    args = Args(**json.load(open(os.path.join(out, "config.json"))))
    assert len(agrpo.toy_model_and_tokenizer(0)[1]("<answer>" + "1234" * 4 + "</answer>")["input_ids"]) < \
        args.completion_length
    assert [m["step"] for m in metric_lines(out)] == [0, 1, 1]


def test_diffu_grpo_runs_end_to_end_and_its_ratio_moves_only_after_an_update(tmp_path, monkeypatch):
    """--estimator diffu-grpo trains the toy through main(): with one gradient step per batch its ratio is 1 and
    no token is clipped; with two, the second step's ratio has moved from 1; with two and learning rate 0 it stays
    exactly 1, as the old log-probs are taken per iteration, under that iteration's prompt mask."""
    monkeypatch.setattr(reward, "reward_parts", count_1)
    for iterations, lr, moved in ((1, "1e-2", False), (2, "1e-2", True), (2, "0", False)):
        run = str(tmp_path / f"{iterations}-{lr}")
        agrpo.main(FAST + ["--estimator", "diffu-grpo", "--num-iterations", str(iterations), "--max-steps", "2",
                           "--learning-rate", lr, "--p-mask-prompt", "0.5", "--output-dir", run])
        lines = metric_lines(run)
        assert len(lines) == 2 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in lines)
        assert (lines[-1]["ratio_max_dev"] > 1e-4) == moved, lines[-1]
        assert moved or lines[-1]["ratio_max_dev"] == lines[-1]["clip_low"] == lines[-1]["clip_high"] == 0


def test_toy_weights_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    """The toy run, its warm-up included, runs on a fixed number of threads whatever the machine's threads or
    OMP_NUM_THREADS: warm-ups begun with 1 and with 3 threads give the same weights (on 1 and 2 threads they
    part within 20 steps)."""
    weights = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / str(threads)))
        args = agrpo.parse_args(["--model", "toy", "--toy-warmup-steps", "20", "--train-examples", "8"])
        model = agrpo.setup(args)[0]
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.get_num_threads() == agrpo.TOY_THREADS and torch.equal(*weights)


def test_lora_on_the_toy_works_and_a_wrong_target_names_the_layers(tmp_path):
    """--model toy --lora-rank 4 trains adapters on the toy's own layer names (the preset's --lora-targets); a name
    the model lacks lists the names it has and the way out, --lora-rank 0."""
    agrpo.main(FAST + ["--lora-rank", "4", "--max-steps", "1", "--output-dir", str(tmp_path / "run")])
    assert set(trained(tmp_path / "run" / "checkpoint-1")) and all("lora_" in k for k in trained(
        tmp_path / "run" / "checkpoint-1"))
    with pytest.raises(SystemExit, match="--lora-targets q_proj: no linear layer of this model has such a name; its "
                                         "layers are named decoder, dense, key, query, value .pick some., or use "
                                         "--lora-rank 0"):
        agrpo.main(FAST + ["--lora-rank", "4", "--lora-targets", "q_proj", "--output-dir", str(tmp_path / "b")])


def test_a_programming_error_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError raised inside the training step (as torch raises one) is no usage error: it surfaces as
    itself, with its traceback, while a bad flag still ends in one sentence."""
    def broken(*a, **k):
        raise ValueError("shapes do not match")
    monkeypatch.setattr(agrpo, "clipped_surrogate", broken)
    with pytest.raises(ValueError, match="shapes do not match") as error:
        agrpo.main(FAST + ["--max-steps", "1", "--output-dir", str(tmp_path)])
    assert any(entry.name == "rl_step" for entry in error.traceback)
    monkeypatch.setattr(agrpo, "clipped_surrogate", lambda *a, **k: (_ for _ in ()).throw(OSError("device lost")))
    with pytest.raises(OSError, match="device lost"):  # an OSError naming no file is no usage error either
        agrpo.main(FAST + ["--max-steps", "1", "--output-dir", str(tmp_path / "2")])
    with pytest.raises(SystemExit, match="--top-p 2.0: must be in"):
        agrpo.main(FAST + ["--top-p", "2"])


def test_eval_only_writes_its_own_files_and_says_where(tmp_path, capsys):
    """--eval-only of a trained run evaluates the restored model at several step counts into new files next
    to the training-time ones (never over them), and prints where."""
    run = str(tmp_path / "run")
    agrpo.main(FAST + ["--max-steps", "1", "--eval-every", "1", "--eval-examples", "4", "--output-dir", run])
    before = {name: open(os.path.join(run, name)).read() for name in os.listdir(run) if name.startswith("eval")}
    metrics = agrpo.main(["--resume", run, "--eval-only", "--eval-sampling-steps", "12,6"])
    assert {"eval_T12_accuracy", "eval_T6_accuracy", "eval_T6_completion_length"} <= set(metrics)
    new = [n for n in os.listdir(run) if n.startswith("eval-only-") and n.endswith("-step1-T6.jsonl")]
    assert len(new) == 1 and sum(1 for _ in open(os.path.join(run, new[0]))) == 4
    assert all(open(os.path.join(run, name)).read() == text for name, text in before.items())
    assert new[0] in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """2 steps, a crash, resume, 2 steps == 4 uninterrupted steps, bit for bit; the log keeps one line a step."""
    monkeypatch.setattr(reward, "reward_parts", count_1)
    straight, crashed = str(tmp_path / "straight"), str(tmp_path / "crashed")
    agrpo.main(FAST + ["--max-steps", "4", "--save-every", "2", "--output-dir", straight])
    agrpo.main(FAST + ["--max-steps", "4", "--save-every", "2", "--output-dir", crashed])
    shutil.rmtree(os.path.join(crashed, "checkpoint-4"))  # as if the run died before its last save,
    with open(os.path.join(crashed, "metrics.jsonl"), "a") as f:  # in the middle of a metrics line
        f.write('{"step": 5, "rew')
    with pytest.raises(SystemExit, match="already holds a run: continue it with --resume"):
        agrpo.main(FAST + ["--max-steps", "4", "--output-dir", crashed])
    agrpo.main(["--resume", crashed])
    a, b = trained(os.path.join(straight, "checkpoint-4")), trained(os.path.join(crashed, "checkpoint-4"))
    first = trained(os.path.join(straight, "checkpoint-2"))
    assert any(not torch.equal(first[k], a[k]) for k in a), "steps 3-4 must change the weights"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metric_lines(crashed)] == [1, 2, 3, 4]


def test_learning_rate_follows_the_cosine_schedule_of_every_gradient_step(tmp_path, monkeypatch):
    """The cosine schedule is sized for the scheduler steps taken: 4 steps x 3 gradient steps per batch are 12
    updates, each at the rate of the warmed-up cosine over 12 (warm-up ceil(0.1 x 12) = 2), computed here."""
    monkeypatch.setattr(agrpo.torch.optim, "AdamW", RecordingAdamW)
    agrpo.main(FAST + ["--max-steps", "4", "--num-iterations", "3", "--warmup-ratio", "0.1",
                       "--learning-rate", "1e-3", "--output-dir", str(tmp_path)])
    expected = [1e-3 * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 10))) for s in range(12)]
    assert RecordingAdamW.latest.lrs == pytest.approx(expected, abs=1e-12)


def test_an_extended_run_trains_on_the_schedule_of_its_new_length(tmp_path, monkeypatch):
    """--resume with a larger --max-steps re-sizes the cosine schedule: step 6 trains at the new schedule's rate
    (1e-3 x cosine over 8 steps, no warm-up, at 5 steps done), computed here, not at the old one's 0."""
    monkeypatch.setattr(agrpo.torch.optim, "AdamW", RecordingAdamW)
    agrpo.main(FAST + ["--max-steps", "5", "--warmup-ratio", "0", "--learning-rate", "1e-3", "--output-dir",
                       str(tmp_path)])
    agrpo.main(["--resume", str(tmp_path), "--max-steps", "8"])
    assert RecordingAdamW.latest.lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8))
                                                       for s in range(5, 8)])


def test_keep_checkpoints_keeps_exactly_that_many(tmp_path):
    """--keep-checkpoints 2 with a save every step keeps the newest two."""
    agrpo.main(FAST + ["--max-steps", "4", "--save-every", "1", "--keep-checkpoints", "2", "--output-dir",
                       str(tmp_path)])
    assert agrpo.checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-3"), str(tmp_path / "checkpoint-4")]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A save that dies midway (here: the disk fills after state.pt) leaves no checkpoint behind, not even a
    temporary one, and the earlier checkpoint stays; the run ends with one sentence naming the file."""
    out, write = str(tmp_path), agrpo.write_atomically
    agrpo.main(FAST + ["--max-steps", "1", "--output-dir", out])

    def disk_full(path, text):
        if path.endswith("args.json"):
            raise OSError(28, "No space left on device", "args.json")
        write(path, text)
    monkeypatch.setattr(agrpo, "write_atomically", disk_full)  # dies after state.pt, before args.json
    with pytest.raises(SystemExit, match="^agrpo: args.json: no space left on device$"):
        agrpo.main(["--resume", out, "--max-steps", "2"])
    assert agrpo.checkpoints(out) == [os.path.join(out, "checkpoint-1")] and trained(agrpo.checkpoints(out)[0])
    assert not [name for name in os.listdir(out) if "tmp" in name]


def test_resuming_what_cannot_be_resumed_ends_with_one_sentence(tmp_path):
    """Resuming with another model structure is refused before training; an older checkpoint than the run's newest
    is refused (going on would overwrite the newer ones); a damaged checkpoint is named, with the way out."""
    out = str(tmp_path)
    agrpo.main(FAST + ["--max-steps", "2", "--save-every", "1", "--output-dir", out])
    with pytest.raises(SystemExit, match="checkpoint-2 holds other trainable weights than this model"):
        agrpo.main(["--resume", out, "--lora-rank", "4"])
    with pytest.raises(SystemExit, match="checkpoint-1 is not the newest checkpoint of .*: going on from it would"):
        agrpo.main(["--resume", os.path.join(out, "checkpoint-1"), "--max-steps", "3"])
    with open(os.path.join(out, "checkpoint-2", "state.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="checkpoint .*checkpoint-2 cannot be read .*: damaged or cut short.; move it "
                                         "aside and resume again"):
        agrpo.main(["--resume", out, "--max-steps", "3"])
    os.rename(os.path.join(out, "checkpoint-2"), str(tmp_path / "aside"))
    agrpo.main(["--resume", out, "--max-steps", "3"])
    assert [m["step"] for m in metric_lines(out)] == [1, 2, 3]  # step 2 again, from checkpoint-1


def test_the_readme_export_gives_a_model_this_program_loads(tmp_path, monkeypatch):
    """A LoRA layer adds (alpha / r) B A x; its adapters switch off for the reference and back on after it. The
    README's export of a trained toy run with adapters, run here line for line, writes a model with the adapted
    outputs, which --model evaluates; a directory without a model, or none at all, is named as such."""
    layer = agrpo.LoRALinear(torch.nn.Linear(3, 2), rank=2, alpha=6, dropout=0.0)  # y = W x + b + (6 / 2) B A x
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 3)
    adapted = layer(x)
    assert torch.allclose(adapted, layer.base(x) + 3 * x @ layer.lora_A.T @ layer.lora_B.T, atol=1e-6)
    with agrpo.adapters_off(layer):
        assert torch.equal(layer(x), layer.base(x))
    assert torch.equal(layer(x), adapted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reward, "reward_parts", count_1)  # a reward the random toy earns: advantages that move B
    agrpo.main(FAST + ["--lora-rank", "4", "--learning-rate", "0.05", "--warmup-ratio", "0", "--max-steps", "1",
                       "--output-dir", "runs/countdown-20261128-093000"])
    args = agrpo.parse_args(["--resume", "runs/countdown-20261128-093000", "--eval-only"])
    model, tokenizer, _, _ = agrpo.setup(args)
    agrpo.load_checkpoint(args.resume, model, args)
    ids = toy_prompts(tokenizer)[0]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with agrpo.adapters_off(model):
            assert not torch.allclose(model(input_ids=ids).logits, adapted, atol=1e-3), "the step must move B"
    for name, module in list(model.named_modules()):  # W + (alpha / r) B A, in W's place
        if isinstance(module, agrpo.LoRALinear):
            module.base.weight.data += (module.lora_B @ module.lora_A).to(module.base.weight.dtype) * module.scale
            agrpo.swap_module(model, name, module.base)
    model.save_pretrained("merged"), tokenizer.save_pretrained("merged")
    assert torch.allclose(BertForMaskedLM.from_pretrained("merged")(input_ids=ids).logits, adapted, atol=1e-4)
    evaluate = ["--device", "cpu", "--dtype", "float32", "--mask-token-id", "2", "--lora-rank", "0", "--data",
                "synthetic", "--eval-only", "--eval-examples", "2", "--eval-completion-length", "8",
                "--eval-block-length", "8", "--eval-sampling-steps", "4", "--output-dir", "eval"]
    assert 0 <= agrpo.main(["--model", "merged"] + evaluate)["eval_T4_accuracy"] <= 1
    os.mkdir("empty")
    for path in ("./empty", "./nowhere"):
        with pytest.raises(SystemExit, match=f"--model {path}: no model directory there"):
            agrpo.main(["--model", path] + evaluate)


# ------------------------------------------------------------------------------------------------------------
# 6. The command line, as a user meets it
def test_typed_flags_win_over_the_toy_preset_and_its_task_values():
    """--model toy only changes defaults: a typed flag keeps its value even when it equals the LLaDA default;
    the preset's task values sit over its general ones."""
    typed = ["--temperature", "0.6", "--top-k", "150", "--lora-rank", "64", "--micro-batch-size", "8"]
    args = agrpo.parse_args(["--model", "toy"] + typed)
    assert (args.temperature, args.top_k, args.lora_rank, args.micro_batch_size) == (0.6, 150, 64, 8)
    assert (args.device, args.completion_length, args.top_p) == ("cpu", 24, 1.0)  # the preset, untyped
    sudoku = agrpo.parse_args(["--model", "toy", "--task", "sudoku"])
    assert all(getattr(sudoku, k) == v for k, v in agrpo.TOY_TASKS["sudoku"].items())
    assert agrpo.parse_args(["--model", "toy", "--num-train-epochs", "1"]).max_steps is None  # epochs set the length


def test_help_shows_each_flag_once_grouped_with_its_default_and_toy_values(capsys):
    """--help lists every field of Args once, dash style, under the file's groups, with its default and its toy
    values; booleans as --x/--no-x."""
    with pytest.raises(SystemExit) as exit:
        agrpo.main(["--help"])
    text = capsys.readouterr().out
    assert exit.value.code == 0
    for f in dataclasses.fields(Args):  # an option's entry starts its line
        assert len(re.findall(rf"^  {agrpo.flag(f.name)}\b", text, re.M)) == 1, f.name
        assert "--" + f.name not in text or "_" not in f.name
    assert "--low-discrepancy, --no-low-discrepancy" in text
    groups = ["task and model", "LoRA", "optimisation", "rollouts", "the estimator", "evaluation", "runs and"]
    assert all(g in text for g in groups) and sorted(groups, key=text.index) == groups
    shown = " ".join(text.split())
    assert re.search(rf"--max-steps N\s+Training steps;.*\(toy: {agrpo.TOY['max_steps']}, sudoku "
                     rf"{agrpo.TOY_TASKS['sudoku']['max_steps']}\)", shown)
    assert re.search(r"--learning-rate X AdamW peak learning rate. \(default: 5e-06; toy: 0.0006", shown)


def test_resume_restores_the_run_settings_and_says_which_checkpoint(tmp_path, monkeypatch, capsys):
    """--resume latest continues the run written last, with every setting it was saved with; a flag typed with it
    wins; one line names the checkpoint it continues."""
    monkeypatch.chdir(tmp_path)
    agrpo.main(FAST + ["--max-steps", "1", "--temperature", "0.7", "--mc-samples", "3", "--output-dir", "runs/old"])
    agrpo.main(FAST + ["--max-steps", "1", "--temperature", "0.7", "--mc-samples", "3"])
    (run,) = [os.path.join("runs", d) for d in os.listdir("runs") if d != "old"]
    os.utime(os.path.join("runs", "old", "config.json"), (time.time() + 100,) * 2)  # old's files, the newest
    capsys.readouterr()
    args = agrpo.parse_args(["--resume", "latest", "--mc-samples", "4"])
    assert (args.temperature, args.mc_samples, args.completion_length, args.output_dir) == (0.7, 4, 16, "runs/old")
    assert args.resume == os.path.join("runs", "old", "checkpoint-1")
    assert capsys.readouterr().out == f"resume: {os.path.join('runs', 'old', 'checkpoint-1')}\n"
    assert agrpo.parse_args(["--resume", run]).output_dir == run


def test_a_toy_checkpoint_without_adapters_is_evaluated_without_the_warm_up(tmp_path, monkeypatch):
    """A toy checkpoint without adapters holds every weight: evaluating it does not repeat the warm-up."""
    agrpo.main(FAST + ["--max-steps", "1", "--toy-warmup-steps", "1", "--output-dir", str(tmp_path)])
    monkeypatch.setattr(agrpo, "warm_up_toy", lambda *a, **k: pytest.fail("the warm-up ran"))
    agrpo.main(["--resume", str(tmp_path), "--eval-only", "--eval-examples", "2"])


def test_evaluation_uses_its_own_settings_not_the_training_ones(toy, tmp_path, monkeypatch):
    """Evaluation decodes with --eval-completion-length, --eval-block-length, each T of --eval-sampling-steps,
    --eval-unmasking, --eval-temperature, --eval-top-k and --eval-top-p, each set apart from its training twin."""
    model, tokenizer = toy
    seen = []
    monkeypatch.setattr(agrpo, "generate", lambda m, ids, mask, a, g: seen.append(a) or
                        agrpo.Rollout(ids, None, torch.zeros(len(ids), 8, dtype=torch.long), *[None] * 6))
    args = toy_run_args(tokenizer, completion_length=16, block_length=8, sampling_steps=8, unmasking="random",
                        temperature=0.7, top_k=3, top_p=0.5, eval_completion_length=12, eval_block_length=4,
                        eval_sampling_steps="6,3", eval_unmasking="low_confidence", eval_temperature=1.3,
                        eval_top_k=5, eval_top_p=0.95, output_dir=str(tmp_path))
    monkeypatch.setattr(agrpo, "grade", lambda tok, c, ex, a: [{"answer": None, "score": 0, "text": ""}] * len(ex))
    agrpo.evaluate(model, tokenizer, [{"question": "12+7=", "nums": [12, 7], "target": 19}], args, 0)
    assert [(a.completion_length, a.block_length, a.sampling_steps, a.unmasking, a.temperature, a.top_k, a.top_p)
            for a in seen] == [(12, 4, T, "low_confidence", 1.3, 5, 0.95) for T in (6, 3)]


def test_the_newest_run_without_a_checkpoint_is_not_passed_over(tmp_path, monkeypatch):
    """When the newest run has no checkpoint (it died before its first), --resume latest says so instead of
    continuing an older run; a new run cannot take a directory that holds a run."""
    monkeypatch.chdir(tmp_path)
    agrpo.main(FAST + ["--max-steps", "1", "--output-dir", "runs/old"])
    os.makedirs("runs/crashed")
    with open("runs/crashed/config.json", "w") as f:
        f.write("{}")
    os.utime("runs/crashed/config.json", (time.time() + 100,) * 2)  # written after all of runs/old
    with pytest.raises(agrpo.UsageError, match="--resume runs/crashed: no checkpoint there"):
        agrpo.parse_args(["--resume", "latest"])
    with pytest.raises(SystemExit, match="runs/crashed already holds a run: continue it with --resume"):
        agrpo.main(FAST + ["--output-dir", "runs/crashed"])


def run_agrpo(argv, cwd, code=None, **kw):
    """agrpo.py in a fresh interpreter, as a user starts it (or `code` run before main, to stage a case)."""
    command = [sys.executable, AGRPO, *argv] if code is None else \
        [sys.executable, "-c", f"import sys, agrpo; {code}; agrpo.main(sys.argv[1:])", *argv]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(AGRPO)), **kw)


def test_ctrl_c_and_sigterm_save_and_say_how_to_resume(tmp_path, monkeypatch):
    """A real Ctrl-C (SIGINT) and a SIGTERM stop two runs at the next safe point: each writes a checkpoint of its
    last whole step, prints one line with the command to resume, and exits 128 + the signal without a traceback;
    the resume command continues from that step."""
    runs = [run_agrpo(FAST + ["--max-steps", "1000", "--save-every", "0", "--output-dir", f"runs/{n}"], tmp_path)
            for n in ("a", "b")]
    deadline = time.time() + 60
    while len(glob.glob(str(tmp_path / "runs" / "*" / "metrics.jsonl"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    runs[0].send_signal(signal.SIGINT)
    runs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=60) for p in runs]
    assert [p.returncode for p in runs] == [130, 143], outputs
    for out, err in outputs:
        assert "Traceback" not in err
        (line,) = [line for line in out.splitlines() if "resume with:" in line]
        assert "(checkpoint saved); resume with: python agrpo.py --resume runs/" in line
        run = re.search(r"--resume (\S+)", line)[1]
        (checkpoint,) = agrpo.checkpoints(str(tmp_path / run))
        step = int(checkpoint.rsplit("-", 1)[1])
        assert step >= 1 and [m["step"] for m in metric_lines(tmp_path / run)] == list(range(1, step + 1))
    monkeypatch.chdir(tmp_path)  # as the user: in the directory the runs started from
    agrpo.main(line.split("resume with: python agrpo.py ")[1].split() + ["--max-steps", str(step + 1)])
    assert [m["step"] for m in metric_lines(tmp_path / run)] == list(range(1, step + 2))


def test_a_stop_just_after_a_save_keeps_that_checkpoint(tmp_path, monkeypatch, capsys):
    """A stop that comes while a checkpoint is being written does not write it again: the run ends with the
    resume line (no "checkpoint saved"), exit 130, and that checkpoint is the run's newest."""
    out, save = str(tmp_path / "run"), agrpo.save_checkpoint

    def save_then_ctrl_c(*a, **k):
        step = save(*a, **k)
        agrpo.STOP_SIGNALS.append(signal.SIGINT)  # as a handler records a Ctrl-C that came during the save
        return step
    monkeypatch.setattr(agrpo, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        agrpo.main(FAST + ["--max-steps", "3", "--save-every", "1", "--output-dir", out])
    assert stop.value.code == 130
    assert f"stopped by SIGINT after step 1 of 3; resume with: python agrpo.py --resume {out}\n" in \
        capsys.readouterr().out
    assert agrpo.checkpoints(out) == [os.path.join(out, "checkpoint-1")]


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """Ctrl-C twice: the first asks the run to stop after the step in progress, the second ends the process at
    once (killed by SIGINT, not the exit code 130 of a finished stop), leaving no partial checkpoint behind. The
    step here never ends by itself (it waits a minute), so only the second Ctrl-C can end the run in time."""
    stall = "import time; agrpo.rl_step = lambda *a, **k: print('in the step', flush=True) or time.sleep(60)"
    process = run_agrpo(FAST + ["--max-steps", "2", "--output-dir", "run"], tmp_path, code=stall,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "in the step\n" in iter(process.stdout.readline, ""), process.stderr.read()[-2000:]
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None, "the first Ctrl-C waits for the step"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGINT, (process.returncode, out, err[-2000:])
    assert "stopping after the step in progress" in out
    assert not glob.glob(str(tmp_path / "run" / "*checkpoint*"))


def test_torchrun_works_with_the_toy_defaults(tmp_path):
    """torchrun --nproc_per_node 2 agrpo.py --model toy --device cpu runs with the preset's batch settings,
    tokens_per_second counts both processes' completions, and the evaluation's rows, drawn on two processes,
    come back whole and in the test set's order."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(free_port()), AGRPO, "--task", "countdown", "--model", "toy",
                             "--device", "cpu", "--max-steps", "1", "--eval-every", "1", "--eval-examples", "6",
                             "--train-examples", "64", "--toy-warmup-steps", "0", "--output-dir",
                             str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = [m for m in metric_lines(tmp_path / "run") if "reward" in m]
    args = Args(**{**agrpo.TOY})
    assert line["tokens_per_second"] == pytest.approx(args.prompts_per_step * args.group_size *
        args.completion_length / sum(line[f"seconds_{k}"] for k in ("generate", "grade", "train")))
    rows = [json.loads(r) for r in open(tmp_path / "run" / "eval-step1-T12.jsonl")]
    test = reward.load_examples("countdown", "test", "synthetic", n=6)
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["question"] for r in rows] == [e["question"] for e in test]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP = ["--prompts-per-step", "4", "--max-steps", "2"]  # 2 prompt groups a process: slices must not overlap


def ddp_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    reward.reward_parts = count_1
    for schedule in ("paper", "released"):
        agrpo.main(FAST + DDP + ["--update-schedule", schedule, "--output-dir", f"{out}-{schedule}"])


def test_two_processes_give_the_update_of_one(tmp_path, monkeypatch):
    """DDP with gloo: 2 ranks x half the prompts reproduce 1 rank x all of them (metrics and weights), under the
    paper's update schedule and under the released trainer's (M updates a step)."""
    import torch.multiprocessing as mp
    workers = mp.start_processes(ddp_worker, args=(free_port(), str(tmp_path / "two")), nprocs=2, join=False)
    deadline = time.time() + 120
    while not workers.join(timeout=1):  # raises if a worker fails
        if time.time() > deadline:
            for p in workers.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish in 120 s")
    monkeypatch.setattr(reward, "reward_parts", count_1)
    monkeypatch.setattr(agrpo, "TOY_THREADS", 1)  # one thread, as each of the two has: float sums in the same order
    for schedule in ("paper", "released"):
        one, two = (str(tmp_path / f"{n}-{schedule}") for n in ("one", "two"))
        agrpo.main(FAST + DDP + ["--update-schedule", schedule, "--output-dir", one])
        logs = [metric_lines(d) for d in (one, two)]
        for a, b in zip(*logs):
            for key in ("reward", "grad_norm", "loss", "advantage_abs"):  # float32 sums in another order: 1e-5
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (schedule, key)
        assert logs[0][1]["grad_norm"] > 0
        a, b = trained(os.path.join(one, "checkpoint-2")), trained(os.path.join(two, "checkpoint-2"))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), schedule


@pytest.mark.parametrize("argv,message", [
    (["--completion-length", "10", "--block-length", "4"], "--block-length 4 does not fit --completion-length 10: "
                                                         "the blocks must tile the completion"),
    (["--model", "toy", "--eval-sampling-steps", "5"], "--eval-sampling-steps 5 does not fit "
                                                        "--eval-completion-length 24 and --eval-block-length 8: T "
                                                        "must divide C .* a multiple of the C/BL = 3 blocks"),
    (["--model", "toy", "--sampling-steps", "9"], "--sampling-steps 9 does not fit .*a multiple of the C/BL = 3"),
    (["--model", "toy", "--sampling-steps", "4"], "--sampling-steps 4 does not fit .*a multiple of the C/BL = 3"),
    (["--device", "cuda:0", "--model", "x", "--data", "synthetic"], "CUDA is not available"),
    (["--task", "gsm8k", "--model", "toy"], "no synthetic data"),
    (["--model", "toy", "--lerning-rate", "1"], "unrecognized arguments: --lerning-rate 1; see --help"),
    (["--model", "toy", "--temperature", "0"], "--temperature 0.0: must be more than 0"),
    (["--model", "toy", "--prompts-per-step", "0"], "--prompts-per-step 0: must be at least 1"),
    (["--model", "toy", "--eval-batch-size", "0"], "--eval-batch-size 0: must be at least 1"),
    (["--model", "toy", "--learning-rate", "-1"], "--learning-rate -1.0: must be 0 or more"),
    (["--model", "toy", "--device", "gpu"], "--device gpu: use cuda, cuda:N"),
    (["--model", "toy", "--max-steps", "-5"], "--max-steps -5: must be at least 1"),
    (["--model", "toy", "--epsilon", "-1"], "--epsilon -1.0: must be more than 0"),
    (["--model", "toy", "--keep-checkpoints", "0"], "--keep-checkpoints 0: must be at least 1"),
    (["--model", "toy", "--lora-rank", "-1"], "--lora-rank -1: must be 0 or more"),
    (["--model", "toy", "--micro-batch-size", "3"], "1 process.es. need whole prompt groups, in micro-batches "
                                                    "that split them: .*--micro-batch-size dividing 8 x --group-size"),
    (["--model", "toy", "--task", "chess"], "argument --task: invalid choice: 'chess'"),
    (["--resume", "nowhere"], "--resume nowhere: no checkpoint there"),
    (["--model", "toy", "--update-schedule", "released", "--prompts-per-step", "4"], "--update-schedule released needs "
                                                                                  "an even number of micro-batches"),
    (["--model", "toy", "--unmasking", "low_confidence"], "--unmasking low_confidence cannot train with --estimator "
                                                          "agrpo: the positions a step reveals would depend on the "
                                                          "parameters, so AGRPO's gradient would be biased"),
])
def test_bad_input_ends_with_one_clear_message(argv, message, monkeypatch):
    """Each malformed setting ends with one sentence naming the fix (SystemExit), before any model is built."""
    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for builder in ("toy_model_and_tokenizer", "from_pretrained"):
        monkeypatch.setattr(agrpo, builder, lambda *a, **k: pytest.fail("the settings were taken"))
    with pytest.raises(SystemExit, match=message):
        agrpo.main(argv)


def test_diffu_grpo_may_unmask_by_confidence():
    """The guard is AGRPO's: diffu-GRPO, which d1 trains with low-confidence unmasking, keeps it."""
    args = agrpo.parse_args(["--model", "toy", "--estimator", "diffu-grpo", "--unmasking", "low_confidence"])
    assert args.unmasking == "low_confidence"


def test_filesystem_failures_end_with_one_sentence(tmp_path, monkeypatch):
    """An --output-dir that is a file, or that cannot be created, ends with one sentence naming it; so does a model
    neither on disk nor reachable (fast, without the hub's retries)."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=f"^agrpo: {tmp_path / 'file'}: file exists$"):
        agrpo.main(FAST + ["--output-dir", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match=f"^agrpo: {tmp_path / 'file'}(/run)?: not a directory$"):
        agrpo.main(FAST + ["--output-dir", str(tmp_path / "file" / "run")])
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        unwritable = "/sys/agrpo-run" if os.path.isdir("/sys") else pytest.skip("no read-only directory here")
    else:
        (tmp_path / "read-only").mkdir(mode=0o555)
        unwritable = str(tmp_path / "read-only" / "run")
    with pytest.raises(SystemExit, match="^agrpo: .*(agrpo-run|read-only/run): "):
        agrpo.main(FAST + ["--output-dir", unwritable])
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # as if the network were down
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(SystemExit, match="is not on this machine and the hub cannot be reached"):
        agrpo.main(["--model", "GSAI-ML/LLaDA-8B-Instruct", "--device", "cpu", "--data", "synthetic"])
    assert time.perf_counter() - start < 10


# ------------------------------------------------------------------------------------------------------------
# 7. The GPU workload: one device's share of the authors' step, timed against its floor (CUDA only)
LLADA_8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=18432,
                      vocab_size=126464)  # ~7.5B parameters; the MLP has the FLOPs of LLaDA's gated 12288 one


def benchmark(shape, device, dtype, prompt_length=200, **settings):
    """Time generate + score + train for 8 completions (C=384, BL=12, T=128, M=24, LoRA r=64 by default) of a
    random BERT-shaped masked LM, and the floor: T bare forwards + M forward+backward passes of the body at the
    same batch and length (no vocabulary projection), measured in the same run."""
    torch.manual_seed(0)
    config = BertConfig(**shape, max_position_embeddings=1024, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = BertForMaskedLM(config)
    finally:
        torch.set_default_dtype(default)
    V = shape["vocab_size"]
    args = Args(device=device, mask_token_id=V - 1, eos_token_id=V - 2, lora_targets="query,key,value,dense",
                **settings)
    agrpo.add_lora(model, args)
    B, length = args.micro_batch_size, prompt_length + args.completion_length
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn, repeat=1):
        fn()  # warm-up
        sync()
        clock = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        return (time.perf_counter() - clock) / repeat

    ids = torch.randint(0, V - 2, (B, length), device=device)
    with torch.no_grad():
        forward = timed(lambda: model.bert(input_ids=ids), 5)
    forward_backward = timed(lambda: model.bert(input_ids=ids).last_hidden_state.float().mean().backward(), 5)
    model.zero_grad(set_to_none=True)

    prompt = torch.randint(0, V - 2, (1, prompt_length), device=device).expand(B, -1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    gen = torch.Generator(device).manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync()
    clock = time.perf_counter()
    model.eval()
    rollout = agrpo.generate(model, prompt, torch.ones_like(prompt), args, gen)
    sync()
    seconds_generate, clock = time.perf_counter() - clock, time.perf_counter()
    rewards = (rollout.tokens % 7 == 0).float().mean(1)  # any function of the tokens will do
    advantages = agrpo.group_advantages(rewards, args.group_size)
    model.train()
    agrpo_backward(model, rollout, advantages, args, gen)
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    sync()
    seconds_train = time.perf_counter() - clock
    floor = args.sampling_steps * forward + args.mc_samples * forward_backward
    return {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "parameters_billion": sum(p.numel() for p in model.parameters()) / 1e9,
            "batch": B, "tokens": length, "seconds_forward": forward, "seconds_forward_backward": forward_backward,
            "seconds_generate": seconds_generate, "seconds_train": seconds_train,
            "floor_generate": args.sampling_steps * forward, "floor_train": args.mc_samples * forward_backward,
            "step_over_floor": (seconds_generate + seconds_train) / floor,
            "tokens_per_second": B * args.completion_length / (seconds_generate + seconds_train),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else 0.0}


def test_benchmark_harness_runs_on_a_tiny_shape():
    """The GPU benchmark's code runs end to end on a CPU at a tiny shape, so its GPU run cannot fail on a typo."""
    result = benchmark(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=300), "cpu", torch.float32, prompt_length=8, completion_length=24,
                       block_length=12, sampling_steps=8, mc_samples=2, lora_rank=4)
    assert result["floor_generate"] > 0 and result["seconds_train"] > 0 and result["step_over_floor"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_is_near_its_floor():
    """On a GPU: `pytest test_agrpo.py -k gpu -s` prints the table the README reports."""
    result = benchmark(LLADA_8B_SHAPE, "cuda", torch.bfloat16)
    print(json.dumps(result, indent=1))
    if os.environ.get("AGRPO_BENCHMARK_JSON"):
        with open(os.environ["AGRPO_BENCHMARK_JSON"], "w") as f:
            json.dump(result, f, indent=1)
    assert result["step_over_floor"] < 1.05 and result["peak_memory_gb"] < 31
