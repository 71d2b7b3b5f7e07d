"""GRPO for RLHF from scratch, in one file, against the Gym API (CleanRL style: read it top to bottom).

GRPO (Shao et al. 2024, DeepSeekMath) is PPO without a critic: for each prompt it samples a group of G
answers and uses each answer's score relative to its group, ``A_i = (R_i - mean(R)) / std(R)``, as the
advantage of every one of its tokens. The environment is the same as in ``ppo_from_scratch.py``; the
prompts are forced (each prompt in G sub-environments) through ``reset(options={"prompt_indices": ...})``.
Only gymnasium, torch and transformers do the work; ``llm_env`` registers the environment and provides
``TokenActions``.

    python examples/grpo_from_scratch.py          # the benchmark's review task (its models are built once)
    python examples/grpo_from_scratch.py --tiny   # toy sizes, for a smoke test
    python examples/grpo_from_scratch.py --policy sft/ --reward rm/ --prompts prompts.jsonl
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from transformers import AutoModelForCausalLM

import llm_env  # registers "llm_env/TextGen-v0"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", help="SFT model directory (default: the benchmark's review task)")
    p.add_argument("--reward", help="reward model directory (needed with --policy)")
    p.add_argument("--prompts", help='JSONL file of {"prompt": ...} lines (needed with --policy)')
    p.add_argument("--tiny", action="store_true", help="the benchmark's toy sizes instead of its quick ones")
    p.add_argument("--cache-dir", help="where the benchmark's models are cached (default $LLM_ENV_CACHE)")
    p.add_argument("--updates", type=int, default=30, help="GRPO updates, one rollout each")
    p.add_argument("--num-envs", type=int, default=64, help="answers per rollout, stepped in parallel")
    p.add_argument("--group-size", type=int, default=8, help="G: answers per prompt (divides --num-envs)")
    p.add_argument("--minibatch-size", type=int, default=16, help="answers per gradient step")
    p.add_argument("--epochs", type=int, default=2, help="passes over each rollout")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--beta", type=float, default=0.2, help="weight of the KL (k3) term in the loss")
    p.add_argument("--clip-range", type=float, default=0.2, help="PPO clip range epsilon")
    p.add_argument("--max-new-tokens", type=int, help="response budget (default: the task's)")
    p.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt when scoring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.policy and not (args.reward and args.prompts):
        p.error("--policy needs --reward and --prompts")
    if args.group_size < 2:  # a group of one has no std (Bessel: n - 1 = 0): NaN advantages
        p.error(f"--group-size {args.group_size}: GRPO compares answers to the same prompt, use 2 or more")
    if args.num_envs % args.group_size:
        p.error(f"--num-envs {args.num_envs} must be a multiple of --group-size {args.group_size}")
    return args


def load_task(args: argparse.Namespace) -> dict:
    """The SFT policy, reward, prompts and (built-in task only) gold rater. Not part of the algorithm."""
    if args.policy:  # your own models: train and score on the same prompts, no gold rater
        return {
            "policy": args.policy,
            "reward": args.reward,
            "train": args.prompts,
            "eval": args.prompts,
            "gold": None,
            "max_new_tokens": args.max_new_tokens or 32,
        }
    # The benchmark's review task: its SFT policy and proxy reward model are built once, then cached.
    from rlhf_bench.leaderboard import BenchmarkSettings, build_artifacts

    settings = BenchmarkSettings.tiny() if args.tiny else BenchmarkSettings.quick()
    art = build_artifacts(settings, cache_dir=args.cache_dir, device=args.device, progress=False)
    return {
        "policy": art.policy_path,
        "reward": art.reward,
        "train": art.train_prompts,
        "eval": art.eval_prompts,
        "gold": art.gold,
        "max_new_tokens": args.max_new_tokens or settings.max_new_tokens,
    }


@torch.no_grad()
def rollout(lm: nn.Module, envs, gen: torch.Generator, seed=None, prompt_indices=None) -> dict:
    """One episode per sub-environment: reset, then act and step until every answer has ended."""
    options = None if prompt_indices is None else {"prompt_indices": prompt_indices}
    obs, _ = envs.reset(seed=seed, options=options)
    prompt_len = obs["attention_mask"].sum(1)  # (B,): observations are left-aligned, right-padded
    B = len(prompt_len)
    logprobs, done = [], torch.zeros(B, dtype=torch.bool, device=prompt_len.device)
    out = {"score": np.zeros(B), "kl": np.zeros(B), "prompt": [""] * B, "response": [""] * B}
    while not done.all():
        # Plain acting: re-encode the whole observation every step. Fine at this size; a real agent keeps
        # a KV cache and feeds one new token per step (agents.TokenSampler does).
        logits = lm(input_ids=obs["input_ids"], attention_mask=obs["attention_mask"]).logits
        last = obs["attention_mask"].sum(1) - 1  # the last real token of each row
        logp = logits[torch.arange(B, device=last.device), last].log_softmax(-1)  # log pi(. | s_t), (B, V)
        tokens = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)  # sample at temperature 1
        logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))  # log pi(a_t|s_t), (B,)
        actions = llm_env.TokenActions(tokens, logprobs[-1])
        obs, _, terminated, truncated, info = envs.step(actions)  # only the final score matters here
        done = done | terminated | truncated
        if "completion" in info:  # Gymnasium 1.x vector info: arrays over sub-envs, "_key" marks who
            for i in np.flatnonzero(info["_completion"]):
                for key in out:
                    if key in info["completion"]:  # no "kl" when the environment has no reference
                        out[key][i] = info["completion"][key][i]
    # A row's final observation is its whole episode: prompt + response (+ EOS), then padding.
    out.update(ids=obs["input_ids"], mask=obs["attention_mask"], prompt_len=prompt_len)
    out["response_len"] = out["mask"].sum(1) - prompt_len
    out["logprobs"] = torch.stack(logprobs, 1)  # (B, T), as sent to the environment
    return out


def response_logprobs(lm: nn.Module, batch: dict, T: int) -> torch.Tensor:
    """One teacher-forced pass over whole episodes: log pi(a_t|s_t) for every response token, (B, T)."""
    logits = lm(input_ids=batch["ids"], attention_mask=batch["mask"]).logits  # (B, L, V)
    # State s_t ends at position prompt_len + t - 1; action a_t is the token at prompt_len + t.
    pos = batch["prompt_len"][:, None] + torch.arange(T, device=logits.device)[None] - 1  # (B, T)
    logp = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).log_softmax(-1)  # (B, T, V)
    return logp.gather(2, batch["ids"].gather(1, pos + 1)[..., None]).squeeze(-1)


def group_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's advantage (Shao et al. 2024, section 4.1.2): each answer's score standardised within its
    group of G answers to the same prompt; it is used for every token of the answer. No critic needed.
    ``scores`` is laid out prompt by prompt: answers 0..G-1 answer the first prompt, and so on."""
    groups = scores.view(-1, group_size)  # (prompts, G)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)


def grpo_update(lm: nn.Module, ref: nn.Module, optimizer, batch: dict, args) -> dict:
    """Group-normalised advantages for one rollout, then a few epochs of PPO-clip steps with the KL."""
    T = int(batch["response_len"].max())
    mask = (torch.arange(T, device=lm.device)[None] < batch["response_len"][:, None]).float()  # (B, T)
    with torch.no_grad():
        old_logp, ref_logp = response_logprobs(lm, batch, T), response_logprobs(ref, batch, T)
        scores = torch.as_tensor(batch["score"], dtype=torch.float32, device=mask.device)
        advantages = group_advantages(scores, args.group_size)
    stats = []
    for _ in range(args.epochs):
        for idx in torch.randperm(len(mask)).split(args.minibatch_size):
            logp = response_logprobs(lm, {k: batch[k][idx] for k in ("ids", "mask", "prompt_len")}, T)
            m, adv = mask[idx], advantages[idx, None]  # (b, T), (b, 1): one advantage per answer
            # PPO's clipped surrogate (Schulman et al. 2017), per token.
            log_ratio = logp - old_logp[idx]
            ratio = log_ratio.exp()
            surrogate = torch.min(ratio * adv, ratio.clamp(1 - args.clip_range, 1 + args.clip_range) * adv)
            # KL to the SFT model in the loss, k3 = pi_ref/pi - log(pi_ref/pi) - 1, as DeepSeekMath does: an
            # unbiased, >= 0 estimate of KL(pi || pi_ref) (http://joschu.net/blog/kl-approx.html), but its
            # gradient through logp is that of KL(pi_ref || pi), equal only near the reference; d^2 / 2 (k2)
            # would give KL(pi || pi_ref)'s exactly (Tang & Munos 2025; llm_env/kl.py, agents.GRPOConfig).
            d = ref_logp[idx] - logp
            kl = d.exp() - d - 1
            # Average over each answer's tokens, then over answers: 1/G sum_i 1/|y_i| sum_t (GRPO's eq. 3).
            # Dr. GRPO (Liu et al. 2025) divides by a constant instead; DAPO averages over all tokens.
            per_answer = ((-surrogate + args.beta * kl) * m).sum(1) / m.sum(1).clamp(min=1)
            loss = per_answer.mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(lm.parameters(), 1.0)  # gradient clipping at 1.0 (Llama 2)
            optimizer.step()
            with torch.no_grad():  # approx_kl between old and new policy, the same k3 estimator
                approx_kl = ((ratio - 1 - log_ratio) * m).sum() / m.sum()
                clipfrac = (((ratio - 1).abs() > args.clip_range).float() * m).sum() / m.sum()
                kl_ref = (kl * m).sum() / m.sum()
            stats.append([loss.item(), kl_ref.item(), approx_kl.item(), clipfrac.item()])
    return dict(zip(("loss", "kl_ref", "approx_kl", "clipfrac"), np.mean(stats, axis=0)))


@torch.no_grad()
def evaluate(lm: nn.Module, envs, samples: int, gold, seed: int) -> dict:
    """Mean proxy score, KL to the SFT model and gold score on the held-out prompts.

    A fixed sampling seed: before and after training see the same random numbers, a fairer comparison."""
    gen = torch.Generator(envs.device).manual_seed(seed)
    queue = np.repeat(np.arange(envs.num_prompts), samples)
    got: dict[str, list] = {"score": [], "kl": [], "prompt": [], "response": []}
    for start in range(0, len(queue), envs.num_envs):
        chunk = queue[start : start + envs.num_envs]  # the last chunk is padded with repeats, dropped
        run = rollout(lm, envs, gen, prompt_indices=np.resize(chunk, envs.num_envs))
        for key, values in got.items():
            values.extend(run[key][: len(chunk)])
    result = {"proxy": float(np.mean(got["score"])), "kl": float(np.mean(got["kl"]))}
    if gold is not None:
        result["gold"] = float(np.mean(gold(got["prompt"], got["response"])))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # minibatch order; answers are sampled with `gen` below
    gen = torch.Generator(args.device).manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # which prompts each update
    task = load_task(args)
    # KL placement: DeepSeekMath puts the KL in the loss (k3) so that the advantage stays the pure
    # group-normalised score; we do the same, so the training environment pays only the reward model's
    # score (no reference, kl_coef = 0) and this file keeps a frozen copy of the SFT model. The other
    # choice is the one ppo_from_scratch.py makes: give the environment reference=... and kl_coef=beta,
    # and standardise each answer's return (score - beta * KL, info["completion"]["return"]) in its group.
    # beta: DeepSeekMath's 0.04 let the KL to the SFT model reach 13 on the review task (proxy -0.18 ->
    # 1.36 but gold only 0.92 -> 1.71: over-optimisation); 0.2 kept it near 2.7 (gold 2.03).
    envs = gym.make_vec(
        "llm_env/TextGen-v0",
        num_envs=args.num_envs,
        prompts=task["train"],
        tokenizer=task["policy"],
        reward=task["reward"],
        kl_coef=0.0,
        max_new_tokens=task["max_new_tokens"],
        device=args.device,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    # Held-out evaluation with the SFT model as the environment's reference, only to measure the KL.
    eval_envs = gym.make_vec(
        "llm_env/TextGen-v0",
        num_envs=min(args.num_envs, 64),
        prompts=task["eval"],
        reference=task["policy"],
        reward=task["reward"],
        kl_coef=0.0,
        max_new_tokens=task["max_new_tokens"],
        device=args.device,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    # eval() for good: no dropout, so the new/old probability ratio is exactly 1 before the first step (TRL).
    lm = AutoModelForCausalLM.from_pretrained(task["policy"]).to(args.device).eval()
    ref = AutoModelForCausalLM.from_pretrained(task["policy"]).to(args.device).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(lm.parameters(), lr=args.lr, eps=1e-5)
    prompts_per_update = args.num_envs // args.group_size
    if prompts_per_update > envs.num_prompts:
        raise ValueError(
            f"{prompts_per_update} prompts per update but only {envs.num_prompts} prompts: "
            "lower --num-envs or raise --group-size"
        )

    def report(when: str) -> dict:
        result = evaluate(lm, eval_envs, args.eval_samples, task["gold"], seed=args.seed + 1)
        print(f"{when}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
        return result

    print(f"held-out evaluation: {eval_envs.num_prompts} prompts x {args.eval_samples} answers")
    before, start, history = report("before training"), time.perf_counter(), []
    for update in range(1, args.updates + 1):
        # 1. Collect: G answers to each of a few prompts, forced into consecutive sub-environments.
        prompts = rng.choice(envs.num_prompts, prompts_per_update, replace=False)
        batch = rollout(
            lm,
            envs,
            gen,
            seed=args.seed if update == 1 else None,
            prompt_indices=np.repeat(prompts, args.group_size),
        )
        # 2. Learn from it.
        stats = grpo_update(lm, ref, optimizer, batch, args)
        stats["score"] = np.mean(batch["score"])
        history.append({k: float(v) for k, v in stats.items()})
        print(f"update {update:3d}  " + "  ".join(f"{k} {v:+.4f}" for k, v in stats.items()), flush=True)
    print(f"trained {args.updates} updates in {time.perf_counter() - start:.0f}s")
    return {"before": before, "after": report("after training"), "history": history}


if __name__ == "__main__":
    main()
