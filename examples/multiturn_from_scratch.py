"""Multi-turn RL at token level from scratch, in one file, against the Gym API (CleanRL style: read it top
to bottom).

The game: the environment thinks of a number from 1 to 8 and the agent has 3 turns to find it; after each
wrong guess a responder answers "higher" or "lower". The language model still acts one token per step: a
turn is a guess and ``<eos>``. When the agent ends a turn, the environment calls the responder, appends the
reply's tokens to the context, and the agent's next turn begins. The observation holds the whole
conversation, and its ``agent_mask`` marks the agent's own tokens: the only ones that are actions, the only
ones that pay the KL penalty, and the only ones the losses below are computed on.

1. A tiny GPT-2 and a word tokenizer are built from configs (offline, ``llm_env.tiny``).
2. Supervised warm start on scripted games, a few seconds: the scripted player guesses at random among the
   numbers still possible (it wins about 62% of its games), so RL starts from a policy that knows the rules.
3. REINFORCE with reward to go (each guess answers for what follows it) and a leave-one-out baseline
   over games with the same secret. Binary search wins 7 games out of 8 in 3 turns: the feedback is worth
   using well, and RL learns to.

Only gymnasium, torch, transformers and numpy do the work; ``llm_env`` registers the environment and
provides ``TokenActions``, the responder's ``Reply`` type and the tiny-model builders. Nothing comes from
``agents`` (whose ``TokenSampler`` and ``collect_episodes`` do the same with a KV cache).

    python examples/multiturn_from_scratch.py          # about a minute on 2 CPU cores
    python examples/multiturn_from_scratch.py --tiny   # a few seconds, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import time

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn

import llm_env  # registers "llm_env/TextGen-v0"
from llm_env.multiturn import Conversation, Reply
from llm_env.tiny import tiny_gpt2, word_tokenizer

NUMBERS = [str(n) for n in range(1, 9)]
PROMPT = "guess my number from 1 to 8 :"
MAX_TURNS = 3  # guesses per game: binary search wins 7 games out of 8, the scripted player about 62%
TURN_COST = 0.1  # paid for every wrong guess: fewer turns are better
FOUL = 1.0  # paid for breaking the rules (a turn that is not one number): worse than losing after 3 guesses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy budget, for a smoke test (a few seconds)")
    p.add_argument("--updates", type=int, help="REINFORCE updates, one rollout each (default 300; tiny 5)")
    p.add_argument("--num-envs", type=int, help="games per rollout, 8 secrets x G (default 64; tiny 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate of the RL phase")
    p.add_argument("--kl-coef", type=float, default=0.02, help="beta of the KL penalty, paid by the env")
    p.add_argument("--sft-steps", type=int, help="supervised steps on scripted games (default 300; tiny 30)")
    p.add_argument(
        "--eval-rollouts", type=int, help="rollouts of num-envs games to score (default 4; tiny 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    defaults = {"updates": 300, "num_envs": 64, "sft_steps": 300, "eval_rollouts": 4}
    if args.tiny:
        defaults = {"updates": 5, "num_envs": 16, "sft_steps": 30, "eval_rollouts": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_envs % len(NUMBERS) or args.num_envs < 2 * len(NUMBERS):
        p.error(f"--num-envs {args.num_envs}: use a multiple of {len(NUMBERS)} (each secret in G >= 2 games)")
    return args


# ------------------------------------------------------------------------------------------- the game
# The environment's prompts are 8 copies of PROMPT: the agent reads the same text in every game, and the
# index of the copy (which the responder and the reward source see, the agent does not) is the secret.
def secret_of(conversation: Conversation) -> int:
    return conversation.prompt_index + 1


def guess_the_number(conversation: Conversation) -> Reply:
    """The responder: the environment calls it when the agent ends a turn (emits ``<eos>``), with the
    conversation so far; the reply's text joins the context, ``Reply(None)`` ends the episode."""
    guess = conversation.last_agent_turn  # the text of the turn just ended, its stop token dropped
    secret = secret_of(conversation)
    if guess not in NUMBERS:
        return Reply(None, reward=-FOUL)  # not a single number: the game ends (terminated), lost
    if int(guess) == secret:
        return Reply(None)  # solved: the game ends (terminated) and the reward source pays 1
    # A per-turn reward, paid on the agent's last token of the turn (its <eos>). After the last allowed turn
    # (max_turns) the environment still asks, pays it, and ends the game truncated without the reply.
    return Reply("higher" if secret > int(guess) else "lower", reward=-TURN_COST)


def solved(prompts: list[str], responses: list) -> list[float]:
    """The reward source, called once per finished game: 1 if the last guess was right. Each response is a
    ``Transcript``: a str (every turn's text) whose ``.conversation`` keeps the structured turns."""
    return [float(r.conversation.last_agent_turn == str(secret_of(r.conversation))) for r in responses]


# -------------------------------------------------------------------------- the policy and its warm start
def agent_logprobs(lm: nn.Module, episodes: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher-forced pass over whole conversations: log pi(token_p | tokens before p) at every position
    p >= 1, (B, L - 1), and the mask of those positions that hold the agent's tokens (its actions).

    The context of a game the agent solved on its third guess (secret 5), as the environment returns it:

        position    0     ...  7   8   9      10      11  12     13     14  15     16     ... 19
        input_ids   guess ...  :   4   <eos>  higher  6   <eos>  lower  5   <eos>  <pad>  ...
        attention   1     ...  1   1   1      1       1   1      1      1   1      0      ...
        agent_mask  0     ...  0   1   1      0       1   1      0      1   1      0      ...

    The token at position p was sampled from logits[:, p - 1] (the state ending at p - 1), so column p - 1 of
    the result scores it; agent_mask[:, 1:] keeps the agent's tokens and drops the prompt, the replies
    ("higher", "lower": context the agent did not choose) and the padding.
    """
    ids, mask = episodes["input_ids"], episodes["attention_mask"]
    logits = lm(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    logp = logits[:, :-1].log_softmax(-1)  # (B, L - 1, V)
    logp = logp.gather(2, ids[:, 1:, None]).squeeze(2)  # (B, L - 1)
    return logp, episodes["agent_mask"][:, 1:].float()


def scripted_games(tokenizer, secrets: np.ndarray, max_turns: int, rng: np.random.Generator) -> dict:
    """Games of a player that guesses uniformly among the numbers still possible, laid out as the
    environment lays out an episode: the prompt, each guess and ``<eos>`` (the agent's), and after a wrong
    guess the reply's tokens, except after the last allowed turn (the game ends there, without the reply)."""
    prompt = tokenizer(PROMPT)["input_ids"]
    rows, masks = [], []
    for secret in secrets:
        low, high = 1, len(NUMBERS)
        ids, mask = list(prompt), [0] * len(prompt)
        for turn in range(max_turns):
            guess = int(rng.integers(low, high + 1))
            ids += [tokenizer.convert_tokens_to_ids(str(guess)), tokenizer.eos_token_id]
            mask += [1, 1]
            if guess == secret or turn == max_turns - 1:
                break
            reply = tokenizer("higher" if secret > guess else "lower", add_special_tokens=False)["input_ids"]
            ids, mask = ids + reply, mask + [0] * len(reply)
            low, high = (guess + 1, high) if secret > guess else (low, guess - 1)
        rows.append(torch.tensor(ids))
        masks.append(torch.tensor(mask))
    pad = nn.utils.rnn.pad_sequence
    return {
        "input_ids": pad(rows, batch_first=True, padding_value=tokenizer.pad_token_id),
        "attention_mask": pad([torch.ones_like(r) for r in rows], batch_first=True),
        "agent_mask": pad(masks, batch_first=True),
    }


def supervised_warm_start(lm: nn.Module, games: dict, steps: int, seed: int) -> float:
    """Cross-entropy on the agent's tokens of scripted games (the prompt and replies are context only):
    the same mask as the RL loss. Returns the last loss."""
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(len(games["input_ids"]), (64,), generator=gen)
        logp, agent = agent_logprobs(lm, {k: v[idx].to(lm.device) for k, v in games.items()})
        loss = -(logp * agent).sum() / agent.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


# ------------------------------------------------------------------------------------------- the rollout
@torch.no_grad()
def rollout(lm: nn.Module, envs, gen: torch.Generator, prompt_indices: np.ndarray) -> dict:
    """One game per sub-environment (prompt ``prompt_indices[i]``, i.e. secret ``prompt_indices[i] + 1``):
    reset, then act and step until every game has ended."""
    obs, _ = envs.reset(options={"prompt_indices": prompt_indices})
    B = envs.num_envs
    rewards, logprobs = [], []
    done = torch.zeros(B, dtype=torch.bool, device=envs.device)
    out = {"score": np.zeros(B), "return": np.zeros(B), "turns": np.zeros(B), "kl": np.zeros(B)}
    out["conversation"] = [None] * B
    while not done.all():
        # Plain acting: one forward pass over the whole observation (prompt, every turn, every reply so far)
        # at every step. A real agent keeps a KV cache and feeds it one token per step, plus, where a reply
        # joined the context, that reply's info["injected_ids"] in one chunk (agents.TokenSampler does).
        logits = lm(input_ids=obs["input_ids"], attention_mask=obs["attention_mask"]).logits
        last = obs["attention_mask"].sum(1) - 1  # the last token of each row: ours, or a reply's
        logp = logits[torch.arange(B, device=last.device), last].log_softmax(-1)  # log pi(. | s_t), (B, V)
        tokens = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)  # temperature 1
        logprobs.append(logp.gather(1, tokens[:, None]).squeeze(1))  # log pi(a_t|s_t): the env pays the KL
        obs, reward, terminated, truncated, info = envs.step(llm_env.TokenActions(tokens, logprobs[-1]))
        # Per-token rewards: -beta * (log pi - log pi_ref) on every token of the agent; -TURN_COST on the
        # <eos> of a wrong guess, -FOUL on a turn that breaks the rules; the score on the game's last token;
        # 0 for a game already over (frozen: AutoresetMode.DISABLED). info["reply"] (texts) and
        # info["injected_ids"] (token ids), masked by info["_reply"], hold the replies that joined a context.
        rewards.append(reward)
        done |= terminated | truncated
        if "completion" in info:  # Gymnasium 1.x vector info: arrays over sub-envs, "_key" marks who
            for i in np.flatnonzero(info["_completion"]):
                for key in out:
                    out[key][i] = info["completion"][key][i]
    # Frozen after their end, the rows of the last observation hold every game whole, agent_mask included.
    out["episodes"] = {k: obs[k] for k in ("input_ids", "attention_mask", "agent_mask")}
    out["rewards"] = torch.stack(rewards, 1)  # (B, steps): column t is the agent's t-th token's reward
    out["logprobs"] = torch.stack(logprobs, 1)  # (B, steps), as sent to the environment
    return out


def advantages_to_go(rewards: torch.Tensor, lengths: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE's per-token advantages, (B, S) over the agent's steps (step t: the agent's t-th token).

    Reward to go, ``G_t = sum of r_t' for t' >= t`` (gamma = 1): a guess is credited with what follows it,
    its reply's cost, the later turns and the final score, not with the turns before it (Williams 1992;
    Sutton & Barto ch. 13). Baseline: the mean ``G_t`` of the other games with the same secret still
    playing at their step t (0 when none is), leave-one-out as in RLOO (Kool et al. 2019, Ahmadian et al.
    2024): it does not depend on the game's own actions, so the gradient stays unbiased. Games are laid
    out group by group; ``lengths`` counts each game's agent tokens."""
    B, S = rewards.shape
    to_go = rewards.flip(1).cumsum(1).flip(1)  # (B, S); rewards are 0 after a game's end
    playing = (torch.arange(S, device=rewards.device)[None] < lengths[:, None]).float()  # (B, S)
    total = (to_go * playing).view(-1, group_size, S)  # (secrets, G, S)
    count = playing.view(-1, group_size, S)
    others = (count.sum(1, keepdim=True) - count).clamp(min=1)
    baseline = ((total.sum(1, keepdim=True) - total) / others).view(B, S)
    return (to_go - baseline) * playing


def reinforce_update(lm: nn.Module, optimizer, batch: dict, group_size: int) -> dict:
    """One REINFORCE step on a rollout: -sum of A_t * log pi(a_t|s_t) over the agent's tokens only."""
    logp, agent = agent_logprobs(lm, batch["episodes"])  # (B, L - 1) each; a new graph, with gradients
    advantages = advantages_to_go(batch["rewards"], agent.sum(1), group_size)  # (B, S), step by step
    # From steps to context positions: cumsum(agent) - 1 numbers the agent's tokens along the context, so
    # the agent's t-th token takes advantages[:, t]; the prompt and the replies take 0 (masked).
    step = (agent.cumsum(1) - 1).clamp(min=0).long()  # (B, L - 1)
    loss = -(advantages.gather(1, step) * agent * logp).sum() / len(logp)  # mean over games
    optimizer.zero_grad()
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(lm.parameters(), 1.0)  # gradient clipping at 1.0 (Llama 2)
    optimizer.step()
    with torch.no_grad():  # -log pi of the sampled tokens: an estimate of the policy's entropy
        nll = -(logp * agent).sum() / agent.sum()
    return {
        "loss": loss.item(),
        "return": batch["rewards"].sum(1).mean().item(),  # KL, turn costs and score, summed
        "success": float(np.mean(batch["score"])),
        "turns": float(np.mean(batch["turns"])),
        "nll": nll.item(),
        "grad_norm": grad_norm.item(),
    }


# ---------------------------------------------------------------------------------------- evaluation
def show(conversation: Conversation) -> str:
    """A game on one line: the agent's guesses and the replies, then the secret."""
    turns = " ".join(t.text if t.role == "assistant" else f"({t.text})" for t in conversation.turns)
    return f"{turns}   [secret {secret_of(conversation)}]"


@torch.no_grad()
def evaluate(lm: nn.Module, envs, rollouts: int, seed: int) -> dict:
    """Success rate, agent turns per game and KL to the reference over every secret equally often. A fixed
    sampling seed: before and after training see the same random numbers."""
    gen = torch.Generator(envs.device).manual_seed(seed)
    secrets = np.resize(np.arange(len(NUMBERS)), envs.num_envs)  # prompt index i <-> secret i + 1
    runs = [rollout(lm, envs, gen, secrets) for _ in range(rollouts)]
    return {
        "success": float(np.mean([r["score"] for r in runs])),
        "turns": float(np.mean([r["turns"] for r in runs])),
        "kl": float(np.mean([r["kl"] for r in runs])),
        "games": [show(c) for c in runs[0]["conversation"][:3]],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)  # scripted games

    # 1. A tiny policy from a config: a word tokenizer over the game's words and a 2-layer GPT-2.
    tokenizer = word_tokenizer([PROMPT, " ".join(NUMBERS), "higher lower"])
    lm = tiny_gpt2(tokenizer, n_embd=64, seed=args.seed).to(args.device)  # eval(): no dropout, ever

    # 2. Supervised warm start on scripted games; the result is also the frozen reference of the KL.
    start = time.perf_counter()
    games = scripted_games(tokenizer, rng.integers(1, len(NUMBERS) + 1, 4096), MAX_TURNS, rng)
    loss = supervised_warm_start(lm, games, args.sft_steps, args.seed)
    print(
        f"supervised warm start: {args.sft_steps} steps, loss {loss:.3f}, {time.perf_counter() - start:.1f}s"
    )
    reference = copy.deepcopy(lm).requires_grad_(False)

    # 3. The environment: 8 identical prompts (the index is the secret), the responder, MAX_TURNS turns.
    # max_new_tokens bounds everything after the prompt, replies included: 3 turns of 2 tokens, 2 replies,
    # and room for a turn that rambles (its budget runs out: truncated, unanswered).
    envs = gym.make_vec(
        "llm_env/TextGen-v0",
        num_envs=args.num_envs,
        prompts=[PROMPT] * len(NUMBERS),
        tokenizer=tokenizer,
        reference=reference,  # the KL is paid on the agent's tokens only; replies are prefilled, not paid
        reward=solved,
        missing_eos_penalty=FOUL,  # a turn that never ends (the budget runs out) breaks the rules too
        kl_coef=args.kl_coef,
        responder=guess_the_number,
        max_turns=MAX_TURNS,
        max_new_tokens=4 * MAX_TURNS,
        device=args.device,
        autoreset_mode=AutoresetMode.DISABLED,
    )

    def report(when: str) -> dict:
        result = evaluate(lm, envs, args.eval_rollouts, seed=args.seed + 1)
        print(f"{when}: success {result['success']:.3f}  turns {result['turns']:.2f}  kl {result['kl']:.3f}")
        for game in result["games"]:
            print(f"    {game}")
        return result

    print(f"evaluation: {args.eval_rollouts * args.num_envs} games, every secret equally often")
    before = report("before RL (scripted player ~0.62, binary search 0.875)")
    optimizer = torch.optim.Adam(lm.parameters(), lr=args.lr)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    group_size = args.num_envs // len(NUMBERS)
    start, history = time.perf_counter(), []
    for update in range(1, args.updates + 1):
        # Every secret in G consecutive sub-environments: the groups of the baseline.
        batch = rollout(lm, envs, gen, np.repeat(np.arange(len(NUMBERS)), group_size))
        stats = reinforce_update(lm, optimizer, batch, group_size)
        history.append(stats)
        if update % max(1, args.updates // 10) == 0 or update == 1:
            print(f"update {update:4d}  " + "  ".join(f"{k} {v:+.3f}" for k, v in stats.items()), flush=True)
    print(f"trained {args.updates} updates in {time.perf_counter() - start:.0f}s")
    return {"before": before, "after": report("after RL"), "history": history}


if __name__ == "__main__":
    main()
