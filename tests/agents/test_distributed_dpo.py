"""Offline and online DPO on 2 gloo processes (CPU), against the single-process run; the ``grpo``, ``dpo``
and ``online-dpo`` commands under ``torchrun --nproc-per-node 2 -m rlhf_bench``.

Each test launches this file (or the command line) under torchrun (1 thread per rank) with a scenario name;
the ranks write what they measured to a work directory and the test compares it with the same computation
done here in one process. Launches have a timeout that fails the test instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from agents.dpo import DPOAgent, DPOConfig
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig
from agents.rollout import Trajectories
from llm_env.distributed import all_gather_objects, full_state_dict, is_main_process, rank
from llm_env.tiny import tiny_gpt2, word_tokenizer
from tests.agents.distributed_common import CORPUS, PROMPTS, assert_same_weights, digest, run_rank

pytestmark = pytest.mark.slow

PAIRS = [
    ("the film was", " good and fun", " bad"),
    ("a great movie", " with a good story", " dull"),
    ("i liked the", " actors", " ending was weak"),
    ("this book is", " long but fun", " cold"),
    ("the food was", " good", " cold and slow"),
    ("the story is", " fun", " weak and dull"),
    ("the plot was", " great", " dull"),
]  # 7 pairs in batches of 2: the last batch of each epoch has one pair, so rank 1 joins with no weight
OFFLINE = dict(
    beta=0.1, learning_rate=1e-3, epochs=2, batch_size=2, lr_schedule="linear", progress=False, seed=1
)
OFFLINE_CASES = {"dpo": {}, "dpo-lora": {"lora_rank": 4}, "dpo-fsdp": {"strategy": "fsdp"}}
ONLINE = dict(
    beta=0.1, learning_rate=1e-3, prompts_per_update=8, minibatch_size=3, epochs=2, progress=False, seed=0
)


def distinct_words(prompts, responses):
    """A reward with ties and non-ties among the two samples of a prompt: the number of distinct words."""
    return [float(len(set(r.split()))) for r in responses]


def half(trajectories: Trajectories, part: int, ties_on_rank_1: bool = False) -> Trajectories:
    """Rank ``part``'s episodes: the first or second half of the prompts, two episodes each; with
    ``ties_on_rank_1`` the second half's scores are all equal (its prompts give no pair)."""
    n = len(trajectories) // 2
    out = trajectories.select(np.arange(part * n, (part + 1) * n))
    if ties_on_rank_1 and part == 1:
        out.scores = np.zeros_like(out.scores)
    return out


def with_ties_on_rank_1(trajectories: Trajectories) -> Trajectories:
    """The whole rollout as one process sees it in the ``ties_on_rank_1`` case."""
    n = len(trajectories) // 2
    scores = trajectories.scores.copy()
    scores[n:] = 0.0
    out = trajectories.select(np.arange(len(trajectories)))
    out.scores = scores
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny policy and reward model, prompt and preference files, and 8 prompts x 2 online-DPO
    samples (the same data for 1 and for 2 ranks)."""
    path = tmp_path_factory.mktemp("distributed_dpo")
    tokenizer = word_tokenizer(CORPUS)
    for name, kwargs in (("policy", {"seed": 2}), ("rm", {"seed": 4, "classifier": True})):
        tiny_gpt2(tokenizer, **kwargs).save_pretrained(path / name)
        tokenizer.save_pretrained(path / name)
    (path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (path / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    agent = OnlineDPOAgent(str(path / "policy"), config=OnlineDPOConfig(**ONLINE))
    env = agent.make_env(PROMPTS, distinct_words, num_envs=4, max_new_tokens=5)
    trajectories = agent.sample(env, np.arange(len(PROMPTS)), seed=0)
    scores = trajectories.scores.reshape(-1, 2)
    assert 0 < int((scores[:, 0] != scores[:, 1]).sum()) < len(PROMPTS)  # pairs and ties
    torch.save(trajectories, path / "online.pt")
    return path


@pytest.fixture(scope="module")
def update_run(work, torchrun):
    """The ``update`` scenario on 2 ranks (launched once for the tests that read its results)."""
    code, output = torchrun(__file__, "update", work, timeout=600)
    assert code == 0, output[-6000:]
    return json.loads((work / "update.json").read_text())


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in full_state_dict(module).items()}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(OFFLINE_CASES))
def test_offline_dpo_on_two_ranks_equals_one_process(work, update_run, name):
    """Each batch is dealt across the ranks and its loss divided by its pair count over both, so 2 ranks
    take the single-process steps on the same pairs in the same order (with LoRA, whose reference is the
    adapter-disabled base, and with FSDP2), and report the same per-step statistics."""
    torch.manual_seed(0)
    agent = DPOAgent(str(work / "policy"), config=DPOConfig(**OFFLINE, **OFFLINE_CASES[name]))
    history = agent.train(PAIRS)
    assert len(history) == 8  # 2 epochs x 4 batches (2, 2, 2, 1 pairs)
    assert_same_weights(load_file(work / f"{name}.safetensors"), state(agent.policy))
    two = update_run["offline"][name]
    for mine, theirs in zip(two, history):
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    if name == "dpo":
        assert len(set(update_run["digests"]["dpo"])) == 1


@pytest.mark.parametrize("case", ["online", "online-ties-on-rank-1"])
def test_online_dpo_update_on_two_ranks_equals_one_process(work, update_run, case):
    """Each rank pairs its own samples; the pairs are ordered as one process holding both ranks' episodes
    would order them, minibatches of 3 pairs are dealt to the ranks that hold them, and the loss is divided
    by the minibatch's pair count over both ranks: the update is the single-process update. Ties are counted
    over both ranks; a rank whose samples all tie joins the collectives with a pair of no weight."""
    trajectories = torch.load(work / "online.pt", weights_only=False)
    if case == "online-ties-on-rank-1":
        trajectories = with_ties_on_rank_1(trajectories)
    agent = OnlineDPOAgent(str(work / "policy"), config=OnlineDPOConfig(**ONLINE))
    stats = agent.learn(trajectories)
    assert_same_weights(load_file(work / f"{case}.safetensors"), state(agent.policy))
    two = update_run["online"][case]
    for key in (
        "pairs",
        "ties",
        "score",
        "chosen_score",
        "rejected_score",
        "loss",
        "reward_accuracy",
        "grad_norm",
    ):
        assert two[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key
    assert two["ties"] > 0 and two["pairs"] > 0


def test_bad_configurations_fail_before_any_work(update_run):
    errors = update_run["errors"]
    assert errors["dpo"].startswith("batch_size=1 pairs cannot give each of the 2 ranks a pair")
    assert errors["online"].startswith("prompts_per_update=3 is not divisible by the world size 2")


def test_online_dpo_trains_on_two_ranks_that_agree(work, torchrun):
    """Several online DPO updates on a token budget: both ranks hold the same weights, report the same global
    statistics (ties, pairs, sampled tokens) and stop after the same update; a run stopped after update 1
    and resumed from its checkpoint ends where the uninterrupted one does."""
    code, output = torchrun(__file__, "train", work, timeout=600)
    assert code == 0, output[-6000:]
    result = json.loads((work / "train.json").read_text())
    assert len(set(result["digests"])) == 1 and result["same_history_on_every_rank"]
    history = result["history"]
    spent = [0] + [h["sampled_tokens"] for h in history]
    assert (
        spent[-1] >= result["budget"] > spent[-2]
    )  # both ranks' tokens: the update that reached it was last
    assert result["ties"] == sum(h["ties"] for h in history)  # counted over both ranks
    assert all(h["pairs"] + h["ties"] == 4 for h in history)  # prompts_per_update, over both ranks
    assert result["resumed_equals_straight"] == [True, True]


def test_commands_under_torchrun(work, torchrun):
    """``grpo``, ``dpo`` and ``online-dpo`` on 2 processes: rank 0 prints once and writes the policy, the
    history and a checkpoint holding both ranks' RNG states."""
    common = ["--device", "cpu", "--no-progress", "--learning-rate", 1e-3]
    env = ["--policy", work / "policy", "--prompts", work / "prompts.jsonl", "--reward", work / "rm"]
    env += ["--num-envs", 2, "--max-new-tokens", 4]
    commands = {
        "grpo": [*env, "--prompts-per-update", 2, "--group-size", 2, "--updates", 2],
        "dpo": ["--policy", work / "policy", "--data", work / "pairs.jsonl", "--batch-size", 4],
        "online-dpo": [*env, "--prompts-per-update", 4, "--minibatch-size", 2, "--updates", 2],
    }
    printed = {
        "grpo": "grpo: 2 updates",
        "dpo": "dpo: 2 steps on 7 pairs",
        "online-dpo": "online-dpo: 2 updates",
    }
    for command, options in commands.items():
        out = work / "cli" / command
        code, output = torchrun("-m rlhf_bench", command, *options, *common, "--out", out)
        assert code == 0, output[-6000:]
        assert output.count(printed[command]) == 1, output[-3000:]  # rank 0 reports, once
        assert len(json.loads((out / "history.json").read_text())) == 2
        assert (out / "policy" / "config.json").is_file()
        checkpoint = torch.load(out / "checkpoint" / "training.pt", weights_only=True)
        assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2


# ----------------------------------------------------------------------------------- the rank's side
def _update(work: Path) -> None:
    errors = {}
    for key, make in (
        ("dpo", lambda: DPOAgent(str(work / "policy"), config=DPOConfig(batch_size=1))),
        ("online", lambda: OnlineDPOAgent(str(work / "policy"), config=OnlineDPOConfig(prompts_per_update=3, minibatch_size=1))),
    ):  # fmt: skip
        try:
            make()
        except ValueError as exc:
            errors[key] = str(exc)
    offline, digests = {}, {}
    for name, overrides in OFFLINE_CASES.items():
        torch.manual_seed(0)
        agent = DPOAgent(str(work / "policy"), config=DPOConfig(**OFFLINE, **overrides))
        offline[name] = agent.train(PAIRS)
        weights = state(agent.policy)  # a collective with FSDP: rank 0 gets the full weights
        if name == "dpo":
            digests[name] = all_gather_objects(digest(agent.policy))
        if is_main_process():
            save_file(weights, str(work / f"{name}.safetensors"))
    trajectories = torch.load(work / "online.pt", weights_only=False)
    online = {}
    for case in ("online", "online-ties-on-rank-1"):
        agent = OnlineDPOAgent(str(work / "policy"), config=OnlineDPOConfig(**ONLINE))
        online[case] = agent.learn(half(trajectories, rank(), ties_on_rank_1=case != "online"))
        if is_main_process():
            save_file(state(agent.policy), str(work / f"{case}.safetensors"))
    if is_main_process():
        result = {"errors": errors, "offline": offline, "online": online, "digests": digests}
        (work / "update.json").write_text(json.dumps(result))


def _train(work: Path) -> None:
    config = OnlineDPOConfig(
        **{**ONLINE, "prompts_per_update": 4, "minibatch_size": 2, "learning_rate": 1e-2}
    )
    budget = 40

    def run(**kwargs):
        agent = OnlineDPOAgent(str(work / "policy"), config=config)
        if kwargs.pop("resume", False):
            agent.load_checkpoint(work / "ck")
        env = agent.make_env(PROMPTS, distinct_words, num_envs=2, max_new_tokens=5)
        return agent, agent.train(env, total_tokens=budget, **kwargs)

    straight, history = run()

    class Interrupt(Exception):
        pass

    def stop_after_one(update, stats):
        if update == 1:
            raise Interrupt

    with contextlib.suppress(Interrupt):
        run(checkpoint_dir=work / "ck", callback=stop_after_one)
    resumed, _ = run(resume=True)
    same = all(
        torch.equal(a, b)
        for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values())
    )
    results = all_gather_objects(same)
    digests = all_gather_objects(digest(straight.policy))
    comparable = [{k: v for k, v in h.items() if not k.endswith(("_per_s", "_seconds"))} for h in history]
    histories = all_gather_objects(comparable)
    if is_main_process():
        result = {
            "digests": digests,
            "same_history_on_every_rank": all(h == histories[0] for h in histories),
            "history": history,
            "ties": straight.ties,
            "budget": budget,
            "resumed_equals_straight": results,
        }
        (work / "train.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_rank({"update": _update, "train": _train})
