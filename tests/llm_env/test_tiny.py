"""The character-level tokenizer: exact round trips (spaces and newlines included), prefix-stable decoding
(what the environment cuts responses with), unknown characters, saving and loading, and an episode in the
environment whose responses it decodes."""

import numpy as np
import torch
from gymnasium.vector import AutoresetMode

import llm_env
from llm_env.models import load_tokenizer
from llm_env.tiny import SPECIAL_TOKENS, char_tokenizer, tiny_gpt2

TEXTS = [
    "Calculate 5 - 3.\nAnswer: 2",
    "  two leading spaces, two trailing  ",
    "a\tb\n\nc  d",
    'How many times does the letter "m" appear?\nAnswer: 1',
    " 4+3=7 7-2=5 answer: 5",
    "",
]


def test_every_character_is_one_token_and_decoding_gives_the_text_back():
    tokenizer = char_tokenizer(TEXTS)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)  # no special tokens added, no characters merged or dropped
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(list(range(3))) == list(SPECIAL_TOKENS)
    assert (
        tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>" and tokenizer.unk_token == "<unk>"
    )


def test_the_decoding_of_a_prefix_is_a_prefix_of_the_decoding():
    tokenizer = char_tokenizer(TEXTS)
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        for k in range(len(ids) + 1):
            assert tokenizer.decode(ids[:k]) == text[:k]
        with_eos = [*ids, tokenizer.eos_token_id]
        assert tokenizer.decode(with_eos, skip_special_tokens=True) == text


def test_the_vocabulary_is_the_corpus_and_printable_ascii_in_a_fixed_order():
    tokenizer = char_tokenizer(["héllo"])
    assert len(tokenizer) == len(SPECIAL_TOKENS) + 100 + 1  # string.printable has 100 characters, plus "é"
    assert tokenizer.decode(tokenizer("héllo\n")["input_ids"]) == "héllo\n"
    assert char_tokenizer(["ba", "c"]).get_vocab() == char_tokenizer(["c", "ab"]).get_vocab()
    small = char_tokenizer(["ab "], printable=False)
    assert len(small) == len(SPECIAL_TOKENS) + 3
    ids = small("a zb")["input_ids"]
    assert ids[2] == small.unk_token_id  # a character outside the vocabulary
    assert small.decode(ids, skip_special_tokens=True) == "a b"


def test_a_saved_char_tokenizer_loads_back_identical(tmp_path):
    tokenizer = char_tokenizer(TEXTS)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"] and loaded.decode(ids) == text


def test_the_environment_cuts_responses_with_spaces_and_newlines_intact():
    """Every response the environment reports is the decoded text after the prompt, character for character
    (a word-level tokenizer would have normalised the spaces and the newline away)."""
    tokenizer = char_tokenizer(["x"])
    prompts = ["Calculate 1 + 2.\nAnswer:", "Spell  backward:\n"]
    seen = []

    def reward(ps, rs):
        seen.extend(zip(ps, rs))
        return [0.0] * len(rs)

    env = llm_env.TextGenVectorEnv(
        num_envs=2,
        prompts=prompts,
        tokenizer=tokenizer,
        reward=reward,
        reference=tiny_gpt2(tokenizer, seed=0),
        max_new_tokens=6,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    env.reset(seed=0, options={"prompt_indices": np.array([0, 1])})
    space, newline = tokenizer.convert_tokens_to_ids([" ", "\n"])
    written = [[space, newline, space, space, 4, newline], [*tokenizer(" a, b\n")["input_ids"]]]
    for step in range(6):
        tokens = torch.tensor([written[0][step], written[1][step]])
        env.step(llm_env.TokenActions(tokens, torch.zeros(2)))
    assert dict(seen) == {
        prompts[0]: " \n  " + tokenizer.convert_ids_to_tokens(4) + "\n",
        prompts[1]: " a, b\n",
    }
