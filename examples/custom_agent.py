"""Plug your own agent into the environment: a 60-line REINFORCE written against the agent protocol.

An agent needs ``act(obs, restarted) -> TokenActions`` (and ``learn(trajectories)`` if it learns); this one
re-reads the whole observation at every step (no KV cache, for brevity), samples a token and reports its
log-probability so the environment pays the exact KL penalty. It learns with REINFORCE (Williams 1992)
and a moving-average baseline, on the environment's own return (reward-model score minus KL).

    python examples/custom_agent.py                  # train it on a toy task
    python examples/custom_agent.py --leaderboard    # add it to the benchmark's leaderboard and run it
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

import llm_env
from agents import Trajectories, collect_episodes
from llm_env.tiny import tiny_gpt2, word_tokenizer


class Reinforce:
    """REINFORCE with a baseline: grad = E[(G - b) * grad log pi(y|x)], G the episode's return."""

    def __init__(self, model: torch.nn.Module, lr: float = 3e-3, seed: int = 0) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.baseline = 0.0

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> llm_env.TokenActions:
        self.model.eval()
        logits = self.model(input_ids=obs["input_ids"], attention_mask=obs["attention_mask"]).logits
        last = obs["attention_mask"].sum(dim=1) - 1  # the last real token of each row
        logp = logits[torch.arange(len(last)), last].log_softmax(-1)  # (B, V)
        tokens = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(1)
        return llm_env.TokenActions(tokens, logp.gather(1, tokens[:, None]).squeeze(1))

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        self.model.train()
        returns = torch.as_tensor(trajectories.returns, dtype=torch.float32)
        loss = 0.0
        for prompt, response, g in zip(trajectories.prompt_ids, trajectories.response_list(), returns):
            ids = torch.cat([prompt, response])[None]
            logp = (
                self.model(ids, attention_mask=torch.ones_like(ids))
                .logits[0, len(prompt) - 1 : -1]
                .log_softmax(-1)
            )
            loss = loss - (g - self.baseline) * logp.gather(1, response[:, None]).sum()
        self.optimizer.zero_grad()
        (loss / len(returns)).backward()
        self.optimizer.step()
        self.baseline = 0.9 * self.baseline + 0.1 * float(returns.mean())
        return {"score": float(np.mean(trajectories.scores)), "return": float(returns.mean())}


def positive_words(prompts: list[str], responses: list[str]) -> list[float]:
    """A stand-in reward model: +1 per positive word in the response."""
    return [float(sum(w in {"good", "great", "fun"} for w in r.split())) for r in responses]


def register_on_the_leaderboard(updates: int, episodes: int) -> None:
    """One registered function puts the agent on ``llm-env benchmark``'s leaderboard."""
    from rlhf_bench.leaderboard import BenchmarkContext, register_agent

    @register_agent("reinforce", description="examples/custom_agent.py: REINFORCE with a baseline")
    def reinforce(ctx: BenchmarkContext) -> Reinforce:
        agent = Reinforce(ctx.load_policy(), lr=1e-4, seed=ctx.settings.seed)
        env = ctx.make_env(kl_coef=ctx.settings.ppo_kl_coef, autoreset_mode=AutoresetMode.DISABLED)
        for update in range(updates):
            agent.learn(collect_episodes(env, agent, episodes, seed=update))
        return agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument(
        "--leaderboard", action="store_true", help="run it in the benchmark next to SFT and PPO"
    )
    parser.add_argument("--tiny", action="store_true", help="with --leaderboard: toy sizes, seconds")
    args = parser.parse_args()

    if args.leaderboard:
        from rlhf_bench.leaderboard import BenchmarkSettings, run_benchmark

        register_on_the_leaderboard(args.updates, args.episodes)
        settings = BenchmarkSettings.tiny() if args.tiny else BenchmarkSettings.quick()
        run_benchmark(settings, agents=["sft", "ppo", "reinforce"], out_dir="runs/custom-agent")
        return

    prompts = ["the film was", "the story is", "i think the actors", "overall it was"]
    tokenizer = word_tokenizer([*prompts, "good great fun bad dull slow and but the plot music ending"])
    reference = tiny_gpt2(tokenizer, seed=1)
    agent = Reinforce(tiny_gpt2(tokenizer, seed=1))  # starts as the reference (the "SFT model")
    env = llm_env.TextGenVectorEnv(
        num_envs=8,
        prompts=prompts,
        tokenizer=tokenizer,
        reference=reference,
        reward=positive_words,
        kl_coef=0.02,
        max_new_tokens=6,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    for update in range(args.updates):
        stats = agent.learn(collect_episodes(env, agent, args.episodes, seed=update))
        if update % 5 == 0 or update == args.updates - 1:
            print(f"update {update:3d}  score {stats['score']:.2f}  return {stats['return']:+.2f}")


if __name__ == "__main__":
    main()
