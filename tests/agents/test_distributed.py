"""Data-parallel PPO, SFT and rejection sampling on 2 gloo processes (CPU), against the single-process run.

Each test launches this file under torchrun (``python -m torch.distributed.run``, 1 thread per rank) with a
scenario name; the ranks write what they measured to a work directory and the test compares it with the
same computation done here in one process. Launches have a timeout that fails the test instead of hanging.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from safetensors.torch import load_file, save_file

from agents.ppo import PPOAgent, PPOConfig
from agents.rejection import RejectionSamplingAgent, RejectionSamplingConfig
from agents.rollout import Trajectories, collect_episodes
from agents.sft import SFTConfig, sft_train
from llm_env.distributed import (
    all_gather_objects,
    deal_minibatches,
    full_state_dict,
    is_main_process,
    rank,
    shard_prompts,
    world_size,
)
from llm_env.models import load_causal_lm
from llm_env.tiny import tiny_gpt2, word_tokenizer
from tests.agents.distributed_common import CORPUS, PROMPTS, assert_same_weights, digest, good_count, run_rank

pytestmark = pytest.mark.slow

EPISODES = 8
UPDATE = dict(
    learning_rate=1e-3,
    episodes_per_update=EPISODES,
    minibatch_size=4,  # two minibatches per epoch, dealt from the rank-order numbering as in one process
    gradient_accumulation_steps=2,
    ppo_epochs=2,
    whiten_rewards=True,
    kl_coef=0.05,
    progress=False,
    seed=0,
)
TRAIN = dict(
    learning_rate=3e-3,
    episodes_per_update=EPISODES,
    minibatch_size=4,
    gradient_accumulation_steps=2,
    lr_schedule="cosine",
    adaptive_kl=True,
    kl_target=0.5,
    kl_coef=0.05,
    ptx_coef=0.5,
    ptx_batch_size=2,
    lora_rank=4,
    progress=False,
    seed=0,
)
SFT = dict(learning_rate=1e-2, epochs=2, batch_size=4, lr_schedule="linear", progress=False, seed=3)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """The tiny GPT-2 has dropout 0.1; SFT trains in train mode, so 1 and 2 processes would draw different masks."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def sft_examples():
    tokenizer = word_tokenizer(CORPUS)
    return [(p, " " + " ".join(c.split()[3:])) for p, c in zip(PROMPTS, CORPUS * 2)][:7], tokenizer


def share(trajectories: Trajectories, index: np.ndarray) -> Trajectories:
    """The episodes ``index`` of ``trajectories`` (what one rank would have collected)."""
    return dataclasses.replace(
        trajectories,
        prompt_ids=[trajectories.prompt_ids[i] for i in index],
        response_ids=trajectories.response_ids[index],
        logprobs=trajectories.logprobs[index],
        rewards=trajectories.rewards[index],
        mask=trajectories.mask[index],
        scores=trajectories.scores[index],
        kl=trajectories.kl[index],
        returns=trajectories.returns[index],
        lengths=trajectories.lengths[index],
        eos=trajectories.eos[index],
        prompt_index=trajectories.prompt_index[index],
        prompts=[trajectories.prompts[i] for i in index],
        responses=[trajectories.responses[i] for i in index],
    )


def weights(agent: PPOAgent) -> dict[str, torch.Tensor]:
    """Full policy and value-head (or critic) weights (a collective with FSDP; rank 0 gets them)."""
    state = {f"policy.{k}": v for k, v in full_state_dict(agent.policy).items()}
    value = ("value_head", agent.value_head) if agent.critic is None else ("critic", agent.critic)
    state.update({f"{value[0]}.{k}": v for k, v in full_state_dict(value[1]).items()})
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny policy and 8 episodes it collected (the same data for 1 and for 2 ranks)."""
    path = tmp_path_factory.mktemp("distributed")
    tokenizer = word_tokenizer(CORPUS)
    policy = tiny_gpt2(tokenizer, seed=2)
    policy.save_pretrained(path / "policy")
    tokenizer.save_pretrained(path / "policy")
    tiny_gpt2(tokenizer, seed=4, classifier=True).save_pretrained(path / "rm")  # the critic's reward model
    tokenizer.save_pretrained(path / "rm")
    agent = PPOAgent(str(path / "policy"), config=PPOConfig(**UPDATE))
    env = agent.make_env(
        PROMPTS, good_count, num_envs=4, max_new_tokens=5, autoreset_mode=AutoresetMode.DISABLED
    )
    torch.save(collect_episodes(env, agent, EPISODES, seed=0), path / "episodes.pt")
    return path


def single_process_update(work: Path, **overrides) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    torch.manual_seed(0)
    agent = PPOAgent(str(work / "policy"), config=PPOConfig(**{**UPDATE, **overrides}))
    stats = agent.learn(torch.load(work / "episodes.pt", weights_only=False))
    return weights(agent), stats


# ------------------------------------------------------------------------------------------------ tests
def test_one_update_on_two_ranks_equals_one_update_in_one_process(work, torchrun):
    """Gradient averaging, global whitening and minibatches dealt by one global order: 2 ranks x 4 episodes
    give the update of 1 process x 8 (rank 0's episodes first), with two minibatches per epoch for two epochs,
    whose episodes are spread unevenly over the ranks."""
    dealt = deal_minibatches([4, 4], 4, epochs=2, generator=torch.Generator().manual_seed(0))  # update 0's
    assert {m.counts for m in dealt} > {(2, 2)}  # some minibatch holds more of one rank's episodes
    code, output = torchrun(__file__, "update", work)
    assert code == 0, output[-6000:]
    expected, stats = single_process_update(work)
    assert_same_weights(load_file(work / "ddp-0.safetensors"), expected)
    result = json.loads((work / "update.json").read_text())
    assert len(set(result["digests"])) == 1  # every rank holds the same weights
    for key in ("score", "kl", "response_length", "advantage_std", "value_mean"):
        assert result["stats"]["ddp-0"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), key
    # With LoRA (the same initialisation on both sides: torch.manual_seed(0) before building the agent).
    lora, _ = single_process_update(work, lora_rank=4)
    assert_same_weights(load_file(work / "ddp-4.safetensors"), lora)
    # With a separate critic initialised from a reward model (its backbone's gradients averaged too).
    critic, _ = single_process_update(work, critic=str(work / "rm"))
    assert_same_weights(load_file(work / "ddp-critic.safetensors"), critic)
    # Bad configurations fail before any work starts, naming the numbers.
    assert result["errors"]["episodes"].startswith(
        "episodes_per_update=9 is not divisible by the world size 2"
    )
    assert result["errors"]["prompts"].startswith("6 prompts cannot give 2 ranks x 4 envs a disjoint shard")
    assert result["errors"]["accumulation"].startswith(
        "gradient_accumulation_steps (4) must divide the per-rank"
    )
    assert result["shards"][0] and not set(result["shards"][0]) & set(result["shards"][1])
    assert sorted(result["shards"][0] + result["shards"][1]) == sorted(PROMPTS)


def test_fsdp2_update_matches_ddp(work, torchrun):
    """FSDP2 (parameters, gradients and optimizer state sharded) makes the same update as DDP, with and
    without LoRA, and with a separate critic."""
    if not (work / "fsdp-0.safetensors").exists():  # the update scenario writes both
        code, output = torchrun(__file__, "update", work)
        assert code == 0, output[-6000:]
    for lora in (0, 4):
        assert_same_weights(
            load_file(work / f"fsdp-{lora}.safetensors"), load_file(work / f"ddp-{lora}.safetensors")
        )
        # save_pretrained gathers the shards into a plain model (LoRA merged) that equals DDP's
        saved = {
            strategy: load_causal_lm(work / f"{strategy}-{lora}-policy").state_dict()
            for strategy in ("ddp", "fsdp")
        }
        assert_same_weights(saved["fsdp"], saved["ddp"])
    assert_same_weights(  # the reward-model critic sharded too
        load_file(work / "fsdp-critic.safetensors"), load_file(work / "ddp-critic.safetensors")
    )
    result = json.loads((work / "update.json").read_text())
    assert result["resumes"] == {"fsdp-0": True, "fsdp-4": True}  # FSDP checkpoints resume exactly
    for key in ("score", "kl", "grad_norm", "policy_loss"):
        assert result["stats"]["fsdp-0"][key] == pytest.approx(result["stats"]["ddp-0"][key], rel=1e-4), key


def test_two_ranks_stay_identical_and_resume_exactly(work, torchrun):
    """Several updates (LoRA with the fused reference, PPO-ptx, adaptive KL, gradient accumulation): the
    ranks hold identical weights and report identical statistics, and a run stopped after update 2 and
    resumed from its checkpoint ends bit for bit where the uninterrupted run does."""
    code, output = torchrun(__file__, "train", work)
    assert code == 0, output[-6000:]
    result = json.loads((work / "train.json").read_text())
    assert len(set(result["digests"])) == 1, result["digests"]
    assert result["same_history_on_every_rank"]
    assert result["resumed_equals_straight"] == [True, True]
    assert result["update_after_resume"] == 4
    history = result["history"]
    # The first rollout samples the reference itself (zero LoRA update); the later ones a policy that moved
    # away from it. A non-zero estimate, not a growing one: at toy sizes the k1 estimate of a tiny KL from 8
    # episodes can be negative (-0.11 at update 3 here), and its sign says nothing about the code.
    assert len(history) == 4 and history[0]["kl"] == 0 and all(h["kl"] != 0 for h in history[1:])
    assert history[1]["kl_coef"] != history[0]["kl_coef"]  # the adaptive controller moved on global KL
    checkpoint = torch.load(work / "ck" / "training.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2  # every rank's RNG state


def test_sft_and_rejection_sampling_on_two_ranks(work, torchrun):
    """SFT on 2 ranks equals SFT in one process on the same data; rejection sampling gathers every rank's
    winners into the pool one process would hold (same prompts, same order) and keeps the ranks identical."""
    code, output = torchrun(__file__, "finetune", work)
    assert code == 0, output[-6000:]
    examples, tokenizer = sft_examples()
    model, metrics = sft_train(
        no_dropout(tiny_gpt2(tokenizer, seed=2)), examples, SFTConfig(**SFT), tokenizer=tokenizer
    )
    two = load_file(work / "sft.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(two[name], value, atol=2e-5, rtol=1e-4, msg=name)
    result = json.loads((work / "finetune.json").read_text())
    assert result["sft_loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    sharded = load_file(work / "sft-fsdp.safetensors")  # FSDP2 trains the same model as DDP
    for name, value in model.state_dict().items():
        torch.testing.assert_close(sharded[name], value, atol=2e-5, rtol=1e-4, msg=name)
    assert result["sft_fsdp_loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    assert result["fsdp_rounds"] == 2 and len(result["fsdp_pool_prompts"]) == 12  # the accumulated pool
    assert (work / "rs-fsdp-policy" / "config.json").is_file()

    rs = RejectionSamplingAgent(str(work / "policy"), config=RejectionSamplingConfig(**result["rs_config"]))
    rng = np.random.default_rng(rs.config.seed * 1_000_003)
    expected = rng.choice(len(PROMPTS), size=rs.config.prompts_per_round, replace=False).tolist()
    assert result["pool_prompts"] == expected  # the pool is in the single-process order of prompts
    assert result["same_pool_on_every_rank"] and len(set(result["digests"])) == 1
    assert result["winner_is_the_best_of_its_prompt"]


def test_a_rank_that_raises_stops_every_rank(work, torchrun):
    """Rank 1 raises while rank 0 waits in the update's first collective: torchrun stops both and exits
    non-zero with rank 1's error, well before the timeout."""
    import time

    start = time.perf_counter()
    code, output = torchrun(__file__, "fail", work, timeout=240)
    assert code != 0
    assert "rank 1 fails on purpose" in output
    assert time.perf_counter() - start < 200


def test_save_pretrained_returns_on_every_rank_once_rank_0_has_written(work, torchrun):
    """Every rank calls ``save_pretrained`` and rank 0 writes, slowly here (3 s before the model's files): a
    rank that loads the policy as soon as the call returns finds rank 0's files, complete, replicated
    (DDP) or gathered from the shards and LoRA-merged (FSDP2). Without the barrier rank 1 found nothing."""
    code, output = torchrun(__file__, "save", work)
    assert code == 0, output[-6000:]
    result = json.loads((work / "save.json").read_text())
    for case in ("ddp-0", "fsdp-4"):
        assert result[case]["found_on_return"] == [True, True], case
        assert len(set(result[case]["loaded"])) == 1, case  # every rank loaded the same weights
    assert result["ddp-0"]["loaded"][0] == result["ddp-0"]["trained"]  # the weights the agent holds


def test_a_rank_0_that_fails_to_save_stops_every_rank(work, torchrun):
    """Rank 0 raises while writing the policy and rank 1 waits for it in ``save_pretrained``: torchrun stops
    both and exits non-zero with rank 0's error, well before the collective timeout."""
    import time

    start = time.perf_counter()
    code, output = torchrun(__file__, "save-fails", work, timeout=240)
    assert code != 0
    assert "rank 0 cannot write on purpose" in output
    assert time.perf_counter() - start < 200


# ----------------------------------------------------------------------------------- the rank's side
def _update(work: Path) -> None:
    errors = {}
    for key, build in (
        ("episodes", lambda: PPOAgent(str(work / "policy"), config=PPOConfig(episodes_per_update=9, minibatch_size=3))),
        ("accumulation", lambda: PPOConfig(minibatch_size=4, episodes_per_update=8, gradient_accumulation_steps=4).check_world_size(2)),
        ("prompts", lambda: shard_prompts(PROMPTS[:6], num_envs=4)),
    ):  # fmt: skip
        try:
            build()
        except ValueError as exc:
            errors[key] = str(exc)
    episodes = torch.load(work / "episodes.pt", weights_only=False)
    mine = share(episodes, np.array_split(np.arange(len(episodes)), world_size())[rank()])
    stats, digests, resumes = {}, [], {}
    for strategy in ("ddp", "fsdp"):
        for lora in (0, 4):
            torch.manual_seed(0)
            agent = PPOAgent(
                str(work / "policy"), config=PPOConfig(**UPDATE, strategy=strategy, lora_rank=lora)
            )
            stats[f"{strategy}-{lora}"] = agent.learn(mine)
            agent.save_pretrained(
                work / f"{strategy}-{lora}-policy"
            )  # FSDP: gathered, LoRA merged, on rank 0
            state = weights(agent)
            if strategy == "ddp" and lora == 0:
                digests = all_gather_objects(digest(agent.policy))
            if is_main_process():
                save_file(state, str(work / f"{strategy}-{lora}.safetensors"))
            if strategy == "fsdp":  # a checkpoint of the shards resumes exactly: one more update on each side
                agent.save_checkpoint(work / f"ck-fsdp-{lora}")
                torch.manual_seed(0)
                resumed = PPOAgent(str(work / "policy"), config=agent.config)
                resumed.load_checkpoint(work / f"ck-fsdp-{lora}")
                agent.learn(mine)
                resumed.learn(mine)
                a, b = weights(agent), weights(resumed)
                resumes[f"fsdp-{lora}"] = all(torch.equal(a[k], b[k]) for k in a) and resumed.update == 2
    for strategy in ("ddp", "fsdp"):  # the reward-model critic, replicated and sharded
        torch.manual_seed(0)
        config = PPOConfig(**UPDATE, strategy=strategy, critic=str(work / "rm"))
        agent = PPOAgent(str(work / "policy"), config=config)
        stats[f"{strategy}-critic"] = agent.learn(mine)
        state = weights(agent)
        if is_main_process():
            save_file(state, str(work / f"{strategy}-critic.safetensors"))
    shards = all_gather_objects(shard_prompts(PROMPTS, num_envs=4, seed=0))
    if is_main_process():
        (work / "update.json").write_text(
            json.dumps(
                {"errors": errors, "stats": stats, "digests": digests, "shards": shards, "resumes": resumes}
            )
        )


def _train(work: Path) -> None:
    config = PPOConfig(**TRAIN)
    ptx = CORPUS[:4]

    def run(updates, **kwargs):
        torch.manual_seed(0)
        agent = PPOAgent(str(work / "policy"), config=config, ptx_texts=ptx)
        if kwargs.pop("resume", False):
            agent.load_checkpoint(work / "ck")
        env = agent.make_env(
            PROMPTS, good_count, num_envs=4, max_new_tokens=5, autoreset_mode=AutoresetMode.DISABLED
        )
        return agent, agent.train(env, updates, **kwargs)

    straight, history = run(4)

    class Interrupt(Exception):
        pass

    def stop_after_two(update, stats):
        if update == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(4, checkpoint_dir=work / "ck", callback=stop_after_two)
    resumed, _ = run(4, resume=True)
    same = all(
        torch.equal(a, b)
        for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values())
    ) and torch.equal(straight.value_head.linear.weight, resumed.value_head.linear.weight)
    same = same and resumed.kl_controller.value == straight.kl_controller.value
    results = all_gather_objects(same)
    digests = all_gather_objects(digest(straight.policy))
    histories = all_gather_objects(
        [{k: v for k, v in h.items() if not k.endswith("_per_s")} for h in history]
    )
    if is_main_process():
        result = {
            "digests": digests,
            "resumed_equals_straight": results,
            "same_history_on_every_rank": all(h == histories[0] for h in histories),
            "update_after_resume": resumed.update,
            "history": history,
        }
        (work / "train.json").write_text(json.dumps(result))


def _finetune(work: Path) -> None:
    examples, tokenizer = sft_examples()
    model, metrics = sft_train(
        no_dropout(tiny_gpt2(tokenizer, seed=2)), examples, SFTConfig(**SFT), tokenizer=tokenizer
    )
    sharded, sharded_metrics = sft_train(
        no_dropout(tiny_gpt2(tokenizer, seed=2)),
        examples,
        SFTConfig(**SFT, strategy="fsdp"),
        tokenizer=tokenizer,
    )
    sharded_state = full_state_dict(sharded)  # a collective: every rank calls it
    if is_main_process():
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(work / "sft.safetensors"))
        save_file({k: v.clone() for k, v in sharded_state.items()}, str(work / "sft-fsdp.safetensors"))
    rs_config = dict(k=2, prompts_per_round=6, kl_groups=2, kl_prompts=3, progress=False, seed=1)
    config = RejectionSamplingConfig(
        **rs_config, sft=SFTConfig(learning_rate=1e-3, batch_size=4, progress=False)
    )
    agent = RejectionSamplingAgent(str(work / "policy"), config=config)
    env = agent.make_env(PROMPTS, good_count, num_envs=3, max_new_tokens=5, reference=str(work / "policy"))
    stats = agent.train(env)[0]
    pools = all_gather_objects(agent.pool)
    digests = all_gather_objects(digest(agent.policy))
    # Two rounds with the policy sharded by FSDP2 (sampling gathers the full weights, SFT trains the shards).
    fsdp_sft = SFTConfig(learning_rate=1e-3, batch_size=4, progress=False, strategy="fsdp")
    sharded_rs = RejectionSamplingAgent(
        str(work / "policy"), config=RejectionSamplingConfig(**{**rs_config, "rounds": 2}, sft=fsdp_sft)
    )
    fsdp_history = sharded_rs.train(sharded_rs.make_env(PROMPTS, good_count, num_envs=3, max_new_tokens=5))
    sharded_rs.save_pretrained(work / "rs-fsdp-policy")  # gathers the shards; rank 0 writes
    if is_main_process():
        result = {
            "sft_loss": metrics["loss"],
            "sft_fsdp_loss": sharded_metrics["loss"],
            "fsdp_rounds": len(fsdp_history),
            "fsdp_pool_prompts": [item["prompt_index"] for item in sharded_rs.pool],
            "rs_config": rs_config,
            "pool_prompts": [item["prompt_index"] for item in agent.pool],
            "same_pool_on_every_rank": all(p == pools[0] for p in pools),
            "digests": digests,
            # best_score is computed from every rank's gathered scores, the pool from the gathered winners
            "winner_is_the_best_of_its_prompt": stats["best_score"]
            == pytest.approx(float(np.mean([item["score"] for item in agent.pool])))
            and stats["best_score"] >= stats["sample_score"],
        }
        (work / "finetune.json").write_text(json.dumps(result))


def _fail(work: Path) -> None:
    agent = PPOAgent(str(work / "policy"), config=PPOConfig(**UPDATE))
    if rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    episodes = torch.load(work / "episodes.pt", weights_only=False)
    agent.learn(share(episodes, np.arange(len(episodes) // 2)))  # blocks in a collective until stopped


def _slow_or_failing_writes(fail: bool = False) -> None:
    """On rank 0, make every ``save_pretrained`` of a model wait 3 s before writing (or raise): a rank that
    returned from ``save_policy`` without waiting for rank 0 would look for the files before they exist."""
    if not is_main_process():
        return
    import time

    from transformers import PreTrainedModel

    write = PreTrainedModel.save_pretrained

    def slow(self, *args, **kwargs):
        if fail:
            raise RuntimeError("rank 0 cannot write on purpose")
        time.sleep(3.0)
        return write(self, *args, **kwargs)

    PreTrainedModel.save_pretrained = slow


def _save(work: Path) -> None:
    _slow_or_failing_writes()
    result = {}
    for strategy, lora in (("ddp", 0), ("fsdp", 4)):
        torch.manual_seed(0)
        agent = PPOAgent(str(work / "policy"), config=PPOConfig(**UPDATE, strategy=strategy, lora_rank=lora))
        path = work / f"saved-{strategy}-{lora}"
        agent.save_pretrained(path)
        found = (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        loaded = digest(load_causal_lm(path)) if found else None  # right after the call returned
        result[f"{strategy}-{lora}"] = {
            "found_on_return": all_gather_objects(found),
            "loaded": all_gather_objects(loaded),
            "trained": digest(agent.policy) if strategy == "ddp" else None,
        }
    if is_main_process():
        (work / "save.json").write_text(json.dumps(result))


def _save_fails(work: Path) -> None:
    _slow_or_failing_writes(fail=True)
    agent = PPOAgent(str(work / "policy"), config=PPOConfig(**UPDATE))
    agent.save_pretrained(work / "never-written")  # rank 1 waits here until torchrun stops it
    all_gather_objects(True)  # (without the barrier, rank 1 would wait here instead)


if __name__ == "__main__":
    run_rank(
        {
            "update": _update,
            "train": _train,
            "finetune": _finetune,
            "fail": _fail,
            "save": _save,
            "save-fails": _save_fails,
        }
    )
