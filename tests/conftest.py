"""Shared fixtures: tiny tokenizers and models built from configs, saved and loaded by path.

Nothing is downloaded; every model is a few thousand parameters so the whole suite runs on 2 CPU cores.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from llm_env.tiny import tiny_gpt2, tiny_llama, word_tokenizer

CORPUS = [
    "the film was good and the actors were great",
    "the film was bad and the plot was dull",
    "a great movie with a good story and fine music",
    "i liked the actors but the ending was weak",
    "this book is long but the story is fun",
    "the food was cold and the service was slow",
]
PROMPTS = ["the film was", "a great movie", "i liked the", "this book is", "the food was cold and"]

# transformers warns about deprecated kwargs of its own; keep test output readable.
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer(CORPUS)


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    return tiny_gpt2(tokenizer, seed=1)


@pytest.fixture(scope="session")
def gpt2_policy(tokenizer):
    """A second GPT-2 with other weights, to act as the policy against the reference ``gpt2``."""
    return tiny_gpt2(tokenizer, seed=2)


@pytest.fixture(scope="session")
def llama(tokenizer):
    return tiny_llama(tokenizer, seed=3)


@pytest.fixture(scope="session")
def saved_gpt2(tmp_path_factory, tokenizer, gpt2):
    """The reference GPT-2 and its tokenizer saved with save_pretrained in one directory."""
    path = tmp_path_factory.mktemp("gpt2")
    gpt2.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved_classifier(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("rm")
    tiny_gpt2(tokenizer, seed=4, classifier=True).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def count_good(prompts, responses):
    """A batched reward callable: how many times the response says 'good' or 'great'."""
    return [float(r.split().count("good") + r.split().count("great")) for r in responses]


@pytest.fixture(scope="session")
def reward_fn():
    return count_good


@pytest.fixture
def make_env(tokenizer, gpt2, reward_fn):
    """Factory of single envs with the GPT-2 reference; keyword arguments override the defaults."""
    import llm_env

    def make(**kwargs):
        options = dict(
            prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=gpt2, max_new_tokens=6
        )
        options.update(kwargs)
        return llm_env.TextGenEnv(**options)

    return make


@pytest.fixture
def make_vec_env(tokenizer, gpt2, reward_fn):
    """Factory of vector envs with the GPT-2 reference; keyword arguments override the defaults."""
    import llm_env

    def make(num_envs=3, **kwargs):
        options = dict(
            prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=gpt2, max_new_tokens=6
        )
        options.update(kwargs)
        return llm_env.TextGenVectorEnv(num_envs=num_envs, **options)

    return make


def launch_ranks(script, *args, nproc=2, timeout=300, cwd=None):
    """Run ``script`` (a file or ``-m module``) on ``nproc`` gloo processes with torchrun, 1 thread each.

    Returns ``(returncode, output)``. A run that does not finish within ``timeout`` seconds fails the test
    with its output instead of hanging: the whole process group (torchrun and its workers) is killed.
    Collectives time out after 60 s (``LLM_ENV_DIST_TIMEOUT``), so a blocked rank errors out by itself.
    """
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LLM_ENV_DIST_TIMEOUT": "60",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    target = ["-m", script[3:]] if str(script).startswith("-m ") else [str(script)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "--max-restarts", "0", *target, *map(str, args),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=cwd or root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a timeout kills the workers too
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"{nproc} ranks of {script} did not finish within {timeout} s (a hang?):\n{output[-6000:]}"
        )
    return process.returncode, output


@pytest.fixture
def fail_after():
    """``with fail_after(seconds): ...`` fails the test if the block (e.g. an in-process ``elastic_launch``)
    runs longer than ``seconds``, instead of hanging, and kills the worker processes it left behind."""
    import contextlib
    import multiprocessing
    import signal

    @contextlib.contextmanager
    def guard(seconds: int):
        def expire(signum, frame):
            raise TimeoutError(f"did not finish within {seconds} s (a hang?)")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            for child in multiprocessing.active_children():  # the launcher's workers, if it was interrupted
                child.kill()
                child.join(5)

    return guard


@pytest.fixture(scope="session")
def torchrun():
    """:func:`launch_ranks`: run a script on N gloo processes under torchrun, failing (not hanging) on timeout."""
    return launch_ranks
