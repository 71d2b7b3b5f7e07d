"""What a verifiable task may bring beyond the four methods: its own tokenizer, a context longer than the
built-in tasks' 128 positions, and task families (``<prefix>:<member>`` names resolved on demand)."""

import pytest

from llm_env.tiny import char_tokenizer, word_tokenizer
from rlhf_bench.leaderboard import BenchmarkSettings, SortingTask
from rlhf_bench.leaderboard.tasks import _FAMILIES, get_task, register_task_family, task_directory
from rlhf_bench.leaderboard.verifiable import context_length, task_tokenizer


def test_a_task_without_a_tokenizer_gets_the_word_level_one_it_always_had():
    task = SortingTask()
    tokenizer = task_tokenizer(task)
    assert tokenizer.get_vocab() == word_tokenizer([" ".join(task.vocabulary())]).get_vocab()
    assert tokenizer.decode(tokenizer("sort d b c :")["input_ids"]) == "sort d b c :"


def test_a_task_can_bring_its_own_tokenizer():
    class Chars(SortingTask):
        def tokenizer(self):
            return char_tokenizer(self.vocabulary())

    tokenizer = task_tokenizer(Chars())
    assert len(tokenizer("sort d b c :")["input_ids"]) == len("sort d b c :")

    class Broken(SortingTask):
        tokenizer = "chars"

    with pytest.raises(TypeError, match=r"Broken\.tokenizer must be a method"):
        task_tokenizer(Broken())


def test_the_context_is_128_positions_unless_the_task_needs_more():
    tokenizer = char_tokenizer([])
    assert context_length(tokenizer, ["x" * 96], ["y" * 127], 32) == 128  # 96 + 32 and 127 + <eos> fit
    assert context_length(tokenizer, ["x" * 97], [], 32) == 192  # rounded up to a multiple of 64
    assert context_length(tokenizer, ["x" * 10], ["y" * 200], 32) == 256  # a long training document
    sorting = SortingTask()
    words = task_tokenizer(sorting)
    prompts = sorting.prompts(500, stream=1)
    documents = [p + d for p, d in zip(prompts, sorting.demonstrations(prompts, stream=1))]
    assert context_length(words, prompts, documents, 32) == 128  # the sorting task's policy is unchanged


def test_a_task_family_resolves_its_members_on_demand(tmp_path):
    built = []

    def resolve(member):
        if member == "nope":
            raise ValueError(f"no member {member!r}")
        built.append(member)
        return lambda settings, **options: None

    register_task_family("fam", resolve, description="a family", version=3)
    try:
        entry = get_task("fam:one")
        assert (entry.name, entry.description, entry.version, built) == ("fam:one", "a family", 3, ["one"])
        settings = BenchmarkSettings.tiny()
        directory = task_directory("fam:one", settings, tmp_path)
        assert directory.name == f"fam+one-{settings.artifact_key(task_version=3)}"
        assert task_directory("fam:two", settings, tmp_path).name.startswith("fam+two-")
        with pytest.raises(ValueError, match="no member 'nope'"):
            get_task("fam:nope")
        for bad in ("fam:", "fam:a b", "fam:a/b", "fam:a:b"):
            with pytest.raises(ValueError, match="the member of a fam: task"):
                get_task(bad)
        with pytest.raises(ValueError, match=r"unknown task 'other:one'.*'fam:<name>'"):
            get_task("other:one")
        with pytest.raises(ValueError, match="task family prefixes"):
            register_task_family("a:b", resolve)
    finally:
        _FAMILIES.pop("fam", None)
