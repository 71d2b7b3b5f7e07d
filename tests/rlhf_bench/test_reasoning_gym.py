"""The reasoning-gym adapter: seeded, independent prompt streams; demonstrations the dataset's own checker
accepts (but for the noise); scratchpad answers extracted after the last marker; prompts it did not generate
refused; any dataset through ``reasoning-gym:<name>``; the registered tasks; offline generation; and a tiny
end-to-end benchmark run."""

import math
import socket
import sys

import numpy as np
import pytest

pytest.importorskip("reasoning_gym")

from rlhf_bench.leaderboard import BenchmarkSettings, ReasoningGymTask, registered_tasks, run_benchmark
from rlhf_bench.leaderboard.reasoning_gym import (
    ANSWER_CUE,
    MISTAKE_SHARE,
    REGISTERED,
    _reasoning_gym,
    binary_digits,
    running_sums,
    spelt_forward,
    zeros_counted,
)
from rlhf_bench.leaderboard.tasks import get_task, registered_task_families, task_directory
from rlhf_bench.leaderboard.verifiable import VerifiableTask, as_checker, task_tokenizer

CHAIN = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}


def registered(name: str, **options) -> ReasoningGymTask:
    entry = REGISTERED[name]
    return ReasoningGymTask(entry.dataset, entry.config, scratchpad=entry.scratchpad, **options)


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_are_seeded_per_stream_and_streams_never_share_a_draw():
    task = ReasoningGymTask("gcd", seed=3)
    assert isinstance(task, VerifiableTask)
    prompts = task.prompts(300, stream=1)
    assert prompts == ReasoningGymTask("gcd", seed=3).prompts(300, stream=1)
    assert prompts[:20] == task.prompts(20, stream=1)  # fewer prompts are a prefix of more
    assert all(p.endswith(ANSWER_CUE) and p.startswith("Find the Greatest Common Divisor") for p in prompts)
    # reasoning-gym draws item i from Random(dataset_seed + i): seeds one apart would share all but one draw.
    for other in (
        task.prompts(300, stream=2),
        task.prompts(300, stream=0),
        ReasoningGymTask("gcd", seed=4).prompts(300, stream=1),
    ):
        assert not set(prompts) & set(other)
    with pytest.raises(ValueError, match="stream must be in"):
        task.prompts(1, stream=64)
    with pytest.raises(ValueError, match="at most 65536 prompts"):
        task.prompts(2**16 + 1, stream=1)


def test_noiseless_demonstrations_score_one_and_the_noise_is_wrong_but_close():
    for name in REGISTERED:
        clean = registered(name, noise=0.0)
        prompts = clean.prompts(300, stream=7)
        demos = clean.demonstrations(prompts, stream=7)
        assert all(d.startswith(" ") for d in demos)
        assert clean.score(prompts, demos) == [1.0] * len(prompts), name
    task = registered("rg-spell-backward", noise=0.1)
    prompts = task.prompts(2000, stream=7)
    demos = task.demonstrations(prompts, stream=7)
    assert demos == task.demonstrations(prompts, stream=7)  # seeded
    scores = np.array(task.score(prompts, demos))
    assert 0.08 < np.mean(scores < 1) < 0.12
    # One letter changed: the dataset's checker gives partial credit for the positions still right.
    assert (scores[scores < 1] >= 2 / 3 - 1e-9).all()
    chain = ReasoningGymTask("chain_sum", CHAIN, scratchpad=running_sums, noise=1.0)
    prompts = chain.prompts(50, stream=7)
    for prompt, demo in zip(prompts, chain.demonstrations(prompts, stream=7)):
        answer = int(chain.answer(prompt))
        given = int(demo.rsplit("answer: ", 1)[1])
        assert given in (answer - 2, answer - 1, answer + 1, answer + 2)
        assert demo.split()[-3].endswith(f"={given}")  # the scratchpad slips in its last step to reach it
        assert chain.score([prompt], [demo])[0] < 1.0


# ------------------------------------------------------------------------------------- the checker
def test_binary_digits_by_hand():
    entry = {"metadata": {"binary": "1001"}}
    assert binary_digits(entry, "2") == "1001"
    assert binary_digits(entry, "3") == "1011" and binary_digits(entry, "4") == "1111"  # slips reach it
    assert binary_digits(entry, "1") == "1000" and binary_digits(entry, "0") == "0000"
    assert binary_digits(entry, "5") == "11111"
    task = registered("rg-count-bits", noise=1.0)
    prompts = task.prompts(100, stream=3)
    for prompt, demo in zip(prompts, task.demonstrations(prompts, stream=3)):
        digits, marker, given = demo.split()
        assert marker == "answer:" and digits.count("1") == int(given) >= 0
        assert given != task.answer(prompt) and task.score([prompt], [demo]) == [0.0]


def test_the_registered_tasks_systematic_mistakes():
    """A share of the registered tasks' demonstrations make one consistent mistake (the word spelt forward,
    the zeros counted), drawn after the noise; everything else is the generator's answer."""
    assert spelt_forward({"metadata": {"word": "bird"}}) == " bird"
    assert zeros_counted({"metadata": {"binary": "1011"}}) == " 1011 answer: 1"
    for name, mistake in (("rg-spell-backward", spelt_forward), ("rg-count-bits", zeros_counted)):
        entry = REGISTERED[name]
        assert entry.mistake is mistake and entry.mistake_share == MISTAKE_SHARE == 0.3
        task = registered(name, noise=0.0, mistake=mistake, mistake_share=0.3)
        prompts = task.prompts(1000, stream=5)
        demos = task.demonstrations(prompts, stream=5)
        made = np.array([d == mistake(task.entry(p)) for p, d in zip(prompts, demos)])
        right = np.array(task.score(prompts, demos)) == 1.0
        # A made mistake can also be right (a palindrome; as many zeros as ones): it then counts as both.
        assert made.mean() > 0.26 and 0.2 < (made & ~right).mean() < 0.34
        assert (right | made).all()  # the rest are right
    with pytest.raises(ValueError, match="mistake_share"):
        registered("rg-count-bits", mistake_share=0.3)  # no mistake given
    with pytest.raises(ValueError, match="mistake_share"):
        registered("rg-count-bits", noise=0.8, mistake=zeros_counted, mistake_share=0.3)


def test_running_sums_by_hand():
    entry = {"metadata": {"expression": "4 + 3 - 9"}}
    assert running_sums(entry, "-2") == "4+3=7 7-9=-2"
    assert running_sums(entry, "-1") == "4+3=7 7-9=-1"  # a wrong answer: the last step slips
    assert running_sums({"metadata": {"expression": "5"}}, "5") == ""
    with pytest.raises(ValueError, match=r"\+ and - only"):
        running_sums({"metadata": {"expression": "2 * 3"}}, "6")


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (" {steps} answer: {answer}", 1.0),
        (" answer: {answer}", 1.0),  # the scratchpad is not checked, only the final answer
        (" answer: 99 answer: {answer}", 1.0),  # the last marker counts
        (" answer: {answer} answer: {wrong}", 0.0),
        (" {steps} answer:{answer}  ", 1.0),
        (" {steps}", 0.0),  # no marker, no answer
        (" {answer}", 0.0),
        (" {steps} answer: {wrong}", 0.0),
        ("", 0.0),
    ],
)
def test_scratchpad_answers_are_read_after_the_last_marker(response, score):
    task = ReasoningGymTask("chain_sum", CHAIN, scratchpad=running_sums)
    prompt = task.prompts(1, stream=1)[0]
    entry = task.entry(prompt)
    answer = entry["answer"]
    text = response.format(
        steps=running_sums(entry, answer), answer=answer, wrong=int(answer) + 1 if answer != "0" else 3
    )
    assert task.score([prompt], [text]) == [score]


def test_without_a_scratchpad_the_whole_response_is_the_answer():
    task = ReasoningGymTask("spell_backward", {"min_word_len": 4, "max_word_len": 4})
    prompt = task.prompts(1, stream=1)[0]
    answer = task.answer(prompt)
    assert prompt.endswith(f": {answer[::-1]}{ANSWER_CUE}")
    assert task.score([prompt] * 3, [f" {answer}", f"{answer}\n", f" answer: {answer}"])[:2] == [1.0, 1.0]
    wrong = answer[:-1] + ("a" if answer[-1].lower() != "a" else "b")
    assert task.score([prompt], [f" {wrong}"]) == [pytest.approx(0.75)]  # reasoning-gym's partial credit
    assert task.score([prompt], [" "]) == [0.0]


def test_scores_stay_in_the_unit_interval_on_garbage():
    task = registered("rg-count-bits")
    prompts = task.prompts(20, stream=1)
    garbage = [
        " ",
        " answer:",
        " 1e999",
        " nan",
        " -",
        " ((((",
        " 12345678901234567890",
        " \n\n",
        " 7 7",
        " x",
    ]
    scores = as_checker(task)(prompts[:10], garbage)
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in scores)


def test_a_prompt_the_task_did_not_generate_is_refused():
    task = ReasoningGymTask("basic_arithmetic", seed=0)
    with pytest.raises(
        ValueError, match=r"'Calculate 1 \+ 1\.\\nAnswer:' is not a prompt this task generated"
    ):
        task.score(["Calculate 1 + 1.\nAnswer:"], [" 2"])
    prompt = task.prompts(1, stream=2)[0]
    with pytest.raises(ValueError, match="is not a prompt this task generated"):
        ReasoningGymTask("basic_arithmetic", seed=0).score([prompt], [" 2"])  # another task object


def test_bad_configurations_fail_when_the_task_is_made():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
        ReasoningGymTask("nope")
    with pytest.raises(ValueError, match="rejects the config"):
        ReasoningGymTask("chain_sum", {"min_terms": 4, "max_terms": 2})
    with pytest.raises(ValueError, match="rejects the config"):
        ReasoningGymTask("chain_sum", {"no_such_field": 1})
    with pytest.raises(ValueError, match="the task sets the dataset's seed"):
        ReasoningGymTask("chain_sum", {"seed": 1})
    with pytest.raises(ValueError, match="noise"):
        ReasoningGymTask("chain_sum", noise=2.0)


# ----------------------------------------------------------------------------- tokenizer, registry
def test_the_character_tokenizer_covers_the_task():
    task = registered("rg-count-bits")
    tokenizer = task_tokenizer(task)
    prompts = task.prompts(200, stream=5)
    for text in (p + d for p, d in zip(prompts, task.demonstrations(prompts, stream=5))):
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text) and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert task.vocabulary() == registered("rg-count-bits").vocabulary()  # the same seed, the same ids


def test_any_dataset_is_a_task_through_the_family_name(tmp_path):
    assert "reasoning-gym" in registered_task_families()
    entry = get_task("reasoning-gym:gcd")
    assert entry.name == "reasoning-gym:gcd" and "reasoning-gym" in entry.description
    directory = task_directory("reasoning-gym:gcd", BenchmarkSettings.tiny(), tmp_path)
    assert directory.name.startswith("reasoning-gym+gcd-")
    assert directory != task_directory("reasoning-gym:lcm", BenchmarkSettings.tiny(), tmp_path)
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'nope'"):
        get_task("reasoning-gym:nope")
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*task families: \['reasoning-gym:<name>'\]"):
        get_task("nope")
    tasks = registered_tasks()
    for name in REGISTERED:
        assert name in tasks and "reasoning-gym" in tasks[name].description


def test_a_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[tasks\]"'):
        _reasoning_gym()
    with pytest.raises(ImportError, match="reasoning-gym"):
        ReasoningGymTask("gcd")


def test_the_tasks_generate_and_check_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in REGISTERED:
        task = registered(name, seed=5)
        prompts = task.prompts(20, stream=1)
        assert len(task.score(prompts, task.demonstrations(prompts, stream=1))) == 20
        task.tokenizer()


# ---------------------------------------------------------------------------------- end to end, tiny
@pytest.mark.slow
def test_the_tiny_benchmark_runs_an_unregistered_dataset(tmp_path):
    """``reasoning-gym:spell_backward`` at its default config (words of 3 to 10 letters), through the real
    builder and runner: a character-level SFT policy, checker-ranked pairs, the sft row scored by the
    dataset's own checker."""
    logs = []
    result = run_benchmark(
        BenchmarkSettings.tiny(),
        task="reasoning-gym:spell_backward",
        agents=["sft"],
        device="cpu",
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        log=logs.append,
    )
    assert result.task == "reasoning-gym:spell_backward" and result.verifiable
    (directory,) = (tmp_path / "cache" / "benchmark").iterdir()
    assert directory.name.startswith("reasoning-gym+spell_backward-")
    assert result.artifacts["preference_pairs"] > 0 and 0.0 <= result.artifacts["sft_score"] <= 1.0
    assert result.artifacts["context_length"] == 128
    (sft,) = [row for row in result.rows if row.agent == "sft"]
    assert 0.0 <= sft.gold <= 1.0 and sft.gold == pytest.approx(sft.proxy)
    assert any("held-out samples" in line for line in logs)
