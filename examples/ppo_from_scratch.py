"""PPO for RLHF from scratch, in one file, against the Gym API (CleanRL style: read it top to bottom).

The language model is the agent: each step it reads the observation (the prompt plus its answer so far),
picks the next token and reports that token's log-probability. The environment pays the RLHF reward:
``-beta * (log pi - log pi_ref)`` on every token (the KL penalty to the SFT model, computed inside the
environment) plus the reward model's score on the last token. PPO (Schulman et al. 2017) learns from it
with a value head, GAE and clipped losses, as in InstructGPT (Ouyang et al. 2022). Only gymnasium, torch
and transformers do the work; ``llm_env`` registers the environment and provides ``TokenActions``.

    python examples/ppo_from_scratch.py          # the benchmark's review task (its models are built once)
    python examples/ppo_from_scratch.py --tiny   # toy sizes, for a smoke test
    python examples/ppo_from_scratch.py --policy sft/ --reward rm/ --prompts prompts.jsonl
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
    p.add_argument("--updates", type=int, default=30, help="PPO updates, one rollout each")
    p.add_argument("--num-envs", type=int, default=64, help="episodes per rollout, stepped in parallel")
    p.add_argument("--minibatch-size", type=int, default=16, help="episodes per gradient step")
    p.add_argument("--epochs", type=int, default=4, help="passes over each rollout")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--kl-coef", type=float, default=0.1, help="beta of the KL penalty in the reward")
    p.add_argument("--clip-range", type=float, default=0.2, help="PPO clip range epsilon")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    p.add_argument("--gamma", type=float, default=1.0, help="discount (1: the final score counts fully)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda")
    p.add_argument("--max-new-tokens", type=int, help="response budget (default: the task's)")
    p.add_argument("--eval-samples", type=int, default=2, help="answers per held-out prompt when scoring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.policy and not (args.reward and args.prompts):
        p.error("--policy needs --reward and --prompts")
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


class Agent(nn.Module):
    """The policy (a causal LM) and a value head on its last hidden state: one shared trunk, as in TRL."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.lm = AutoModelForCausalLM.from_pretrained(path)
        self.value_head = nn.Linear(self.lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start rather than random guesses
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)  # (B, L, V), (B, L)


@torch.no_grad()
def rollout(lm: nn.Module, envs, gen: torch.Generator, seed=None, prompt_indices=None) -> dict:
    """One episode per sub-environment: reset, then act and step until every answer has ended."""
    options = None if prompt_indices is None else {"prompt_indices": prompt_indices}
    obs, _ = envs.reset(seed=seed, options=options)  # seed once; later resets continue the prompt order
    prompt_len = obs["attention_mask"].sum(1)  # (B,): observations are left-aligned, right-padded
    B = len(prompt_len)
    rewards, logprobs, done = [], [], torch.zeros(B, dtype=torch.bool, device=prompt_len.device)
    out = {"score": np.zeros(B), "kl": np.zeros(B), "prompt": [""] * B, "response": [""] * B}
    while not done.all():
        # Plain acting: re-encode the whole observation every step. Fine at this size; a real agent keeps
        # a KV cache and feeds one new token per step (agents.TokenSampler does).
        logits = lm(input_ids=obs["input_ids"], attention_mask=obs["attention_mask"]).logits
        last = obs["attention_mask"].sum(1) - 1  # the last real token of each row
        logp = logits[torch.arange(B, device=last.device), last].log_softmax(-1)  # log pi(. | s_t), (B, V)
        tokens = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)  # sample at temperature 1
        # Reporting log pi(a_t|s_t) lets the environment pay the exact per-token KL penalty.
        logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))  # log pi(a_t|s_t), (B,)
        actions = llm_env.TokenActions(tokens, logprobs[-1])
        obs, reward, terminated, truncated, info = envs.step(actions)
        rewards.append(reward)  # (B,): 0 for rows already finished (autoreset DISABLED freezes them)
        done = done | terminated | truncated
        if "completion" in info:  # Gymnasium 1.x vector info: arrays over sub-envs, "_key" marks who
            for i in np.flatnonzero(info["_completion"]):
                for key in out:
                    out[key][i] = info["completion"][key][i]
    # A row's final observation is its whole episode: prompt + response (+ EOS), then padding.
    out.update(ids=obs["input_ids"], mask=obs["attention_mask"], prompt_len=prompt_len)
    out["rewards"], out["logprobs"] = torch.stack(rewards, 1), torch.stack(logprobs, 1)  # (B, T) each
    steps = torch.arange(out["rewards"].shape[1], device=prompt_len.device)
    out["token_mask"] = (steps < (out["mask"].sum(1) - prompt_len)[:, None]).float()  # (B, T): real tokens
    return out


def logprobs_and_values(agent: Agent, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher-forced pass over whole episodes: log pi(a_t|s_t) and V(s_t) for every response token."""
    logits, values = agent(batch["ids"], batch["mask"])  # (B, L, V), (B, L)
    T = batch["rewards"].shape[1]
    # State s_t ends at position prompt_len + t - 1; action a_t is the token at prompt_len + t.
    pos = batch["prompt_len"][:, None] + torch.arange(T, device=logits.device)[None] - 1  # (B, T)
    logp = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).log_softmax(-1)  # (B, T, V)
    actions = batch["ids"].gather(1, pos + 1)
    return logp.gather(2, actions[..., None]).squeeze(-1), values.gather(1, pos)  # (B, T), (B, T)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards, values, mask, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE, Schulman et al. 2016: A_t = delta_t + gamma*lam*A_{t+1}, delta_t = r_t + gamma*V_{t+1} - V_t.
    V = 0 after an answer's last token: the episode is over (EOS or the budget), nothing more to earn."""
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    values = values * mask
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values  # the returns are the value head's targets


def ppo_update(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict, args) -> dict:
    """Advantages for one rollout, then a few epochs of minibatch steps on PPO's clipped losses."""
    mask = batch["token_mask"]
    with torch.no_grad():
        old_logp, old_values = logprobs_and_values(agent, batch)
        advantages, returns = gae(batch["rewards"], old_values, mask, args.gamma, args.lam)
        # Advantage whitening over the batch's real tokens, as in OpenAI baselines' PPO2.
        mean = masked_mean(advantages, mask)
        std = masked_mean((advantages - mean) ** 2, mask).sqrt()
        advantages = (advantages - mean) / (std + 1e-8) * mask
    stats = []
    for _ in range(args.epochs):
        for idx in torch.randperm(len(mask)).split(args.minibatch_size):
            logp, values = logprobs_and_values(
                agent, {k: batch[k][idx] for k in ("ids", "mask", "prompt_len", "rewards")}
            )
            m, adv = mask[idx], advantages[idx]
            # Clipped surrogate objective, Schulman et al. 2017 eq. 7 (negated: we minimise).
            log_ratio = logp - old_logp[idx]
            ratio = log_ratio.exp()
            clipped = ratio.clamp(1 - args.clip_range, 1 + args.clip_range)
            pg_loss = masked_mean(torch.max(-adv * ratio, -adv * clipped), m)
            # Clipped value loss, as in OpenAI baselines' PPO2 and TRL's PPO.
            v_clip = old_values[idx] + (values - old_values[idx]).clamp(-args.clip_range, args.clip_range)
            v_err = torch.max((values - returns[idx]) ** 2, (v_clip - returns[idx]) ** 2)
            v_loss = 0.5 * masked_mean(v_err, m)
            optimizer.zero_grad()
            (pg_loss + args.vf_coef * v_loss).backward()
            nn.utils.clip_grad_norm_(agent.parameters(), 1.0)  # gradient clipping at 1.0 (Llama 2)
            optimizer.step()
            with torch.no_grad():  # approx_kl: the k3 estimator, http://joschu.net/blog/kl-approx.html
                approx_kl = masked_mean(ratio - 1 - log_ratio, m)
                clipfrac = masked_mean(((ratio - 1).abs() > args.clip_range).float(), m)
            stats.append([pg_loss.item(), v_loss.item(), approx_kl.item(), clipfrac.item()])
    return dict(zip(("pg_loss", "v_loss", "approx_kl", "clipfrac"), np.mean(stats, axis=0)))


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
    task = load_task(args)

    def make_envs(prompts, num_envs: int) -> gym.vector.VectorEnv:
        # The SFT model is the reference: the environment computes the KL penalty with it.
        return gym.make_vec(
            "llm_env/TextGen-v0",
            num_envs=num_envs,
            prompts=prompts,
            reference=task["policy"],
            reward=task["reward"],
            kl_coef=args.kl_coef,
            max_new_tokens=task["max_new_tokens"],
            device=args.device,
            autoreset_mode=AutoresetMode.DISABLED,
        )

    envs, eval_envs = make_envs(task["train"], args.num_envs), make_envs(task["eval"], min(args.num_envs, 64))
    # eval() for good: no dropout, so the new/old probability ratio is exactly 1 before the first step (TRL).
    agent = Agent(task["policy"]).to(args.device).eval()
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)

    def report(when: str) -> dict:
        result = evaluate(agent.lm, eval_envs, args.eval_samples, task["gold"], seed=args.seed + 1)
        print(f"{when}: " + "  ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
        return result

    print(f"held-out evaluation: {eval_envs.num_prompts} prompts x {args.eval_samples} answers")
    before, start, history = report("before training"), time.perf_counter(), []
    for update in range(1, args.updates + 1):
        # 1. Collect one episode per sub-environment with the current policy, 2. learn from it.
        batch = rollout(agent.lm, envs, gen, seed=args.seed if update == 1 else None)
        stats = ppo_update(agent, optimizer, batch, args)
        stats.update(score=np.mean(batch["score"]), kl=np.mean(batch["kl"]))
        history.append({k: float(v) for k, v in stats.items()})
        print(f"update {update:3d}  " + "  ".join(f"{k} {v:+.4f}" for k, v in stats.items()), flush=True)
    print(f"trained {args.updates} updates in {time.perf_counter() - start:.0f}s")
    return {"before": before, "after": report("after training"), "history": history}


if __name__ == "__main__":
    main()
