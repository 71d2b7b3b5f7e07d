"""Chat prompts: conversations rendered with the chat template, end-of-turn stop tokens, and reward models
that score the conversation with their own template."""

import json

import numpy as np
import pytest
import torch

import llm_env
from llm_env.chat import ChatPrompt, conversation_text, end_of_turn_ids, render
from llm_env.reward import SequenceClassifierReward, sequence_scores
from llm_env.tiny import chat_tokenizer, tiny_gpt2

CORPUS = ["the film was good and the actors were great", "a great movie with a good story"]
CONVERSATIONS = [
    [{"role": "user", "content": "the film was"}],
    [
        {"role": "system", "content": "a great movie"},
        {"role": "user", "content": "the actors were"},
    ],
]
# Llama 3's layout: a header per turn and <|eot_id|> to close it.
LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Gemma's layout: the assistant is the "model" and a turn closes with <end_of_turn>.
GEMMA_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}\n{{ message['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tok():
    return chat_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def chat_model(chat_tok):
    return tiny_gpt2(chat_tok, seed=1)


def llama3_tokenizer():
    return chat_tokenizer(
        [*CORPUS, "model"],
        template=LLAMA3_TEMPLATE,
        turn_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    )


def test_conversations_are_rendered_up_to_the_assistants_turn(chat_tok, chat_model):
    seen = {}

    def reward(prompts, responses):
        seen["prompts"], seen["responses"] = list(prompts), list(responses)
        return [0.0] * len(prompts)

    env = llm_env.TextGenEnv(
        prompts=CONVERSATIONS, tokenizer=chat_tok, reference=chat_model, reward=reward, max_new_tokens=4
    )
    text, ids = render(chat_tok, CONVERSATIONS[1])
    assert text == (
        "<|im_start|>system\na great movie<|im_end|>\n<|im_start|>user\nthe actors were<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    np.testing.assert_array_equal(env.prompt_token_ids(1), ids)
    assert chat_tok.convert_ids_to_tokens(ids[-2:]) == ["<|im_start|>", "assistant"]
    assert env.prompt_text(1) == text and env.prompt_text(1).messages == CONVERSATIONS[1]

    # The episode ends at the template's end-of-turn token; the reward source sees the rendered prompt
    # (a ChatPrompt carrying the messages) and the response text without the turn marker.
    eot = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert env.stop_token_ids == [chat_tok.eos_token_id, eot]
    env.reset(options={"prompt_index": 1})
    env.step(chat_tok.convert_tokens_to_ids("good"))
    _, _, terminated, truncated, info = env.step(eot)
    assert terminated and not truncated
    assert isinstance(seen["prompts"][0], ChatPrompt) and seen["prompts"][0].messages == CONVERSATIONS[1]
    assert seen["responses"] == [" good"]
    assert info["completion"]["eos"]


def test_text_prompts_with_chat_template_are_one_user_message(chat_tok, chat_model):
    env = llm_env.TextGenEnv(
        prompts=["the film was"],
        tokenizer=chat_tok,
        reference=chat_model,
        reward=lambda p, r: [0.0] * len(p),
        chat_template=True,
    )
    np.testing.assert_array_equal(env.prompt_token_ids(0), render(chat_tok, CONVERSATIONS[0])[1])
    plain = llm_env.TextGenEnv(
        prompts=["the film was"], tokenizer=chat_tok, reference=chat_model, reward=lambda p, r: [0.0] * len(p)
    )
    assert plain.prompt_text(0) == "the film was" and not isinstance(plain.prompt_text(0), ChatPrompt)
    assert plain.stop_token_ids == [chat_tok.eos_token_id]  # no chat: EOS only


def test_conversations_from_jsonl_and_from_a_datasets_column(chat_tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c, "id": i}) for i, c in enumerate(CONVERSATIONS)))
    assert llm_env.load_prompts(path, key="messages") == CONVERSATIONS
    datasets = pytest.importorskip("datasets")
    column = datasets.Dataset.from_dict({"messages": CONVERSATIONS, "label": [0, 1]})
    assert llm_env.load_prompts(column, key="messages") == CONVERSATIONS


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [{"prompt": [{"role": "user"}]}],
            r"chats.jsonl:1: field 'prompt': message 0 needs 'role' and 'content'",
        ),
        ([{"prompt": []}], r"chats.jsonl:1: field 'prompt': the conversation has no messages"),
        (
            [
                {"prompt": "fine"},
                {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            ],
            r"chats.jsonl:2: .*ends with an assistant message",
        ),
        (
            [{"prompt": 3}],
            r"chats.jsonl:1: field 'prompt' must be a string or a list of chat messages, got int",
        ),
    ],
)
def test_malformed_conversations_are_reported_with_their_line(rows, match, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ValueError, match=match):
        llm_env.load_prompts(path)


def test_a_tokenizer_without_a_template_cannot_render_conversations(tokenizer, gpt2):
    with pytest.raises(ValueError, match="has no chat template"):
        llm_env.TextGenEnv(
            prompts=CONVERSATIONS, tokenizer=tokenizer, reference=gpt2, reward=lambda p, r: [0.0]
        )


@pytest.mark.parametrize(
    ("template", "tokens", "end"),
    [
        (None, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
        (
            LLAMA3_TEMPLATE,
            ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "<|eot_id|>",
        ),
        (GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    ],
)
def test_end_of_turn_token_of_each_template_family(template, tokens, end):
    options = {"template": template} if template else {}
    tok = chat_tokenizer([*CORPUS, "model"], turn_tokens=tokens, **options)
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == [end]


def test_reward_model_scores_the_conversation_with_its_own_template(chat_tok, chat_model):
    """The policy speaks ChatML; the reward model was trained on Llama 3's layout: it must see that one."""
    rm_tok = llama3_tokenizer()
    rm = SequenceClassifierReward(tiny_gpt2(rm_tok, seed=4, classifier=True), rm_tok)
    env = llm_env.TextGenEnv(
        prompts=CONVERSATIONS[1:], tokenizer=chat_tok, reference=chat_model, reward=rm, max_new_tokens=3
    )
    prompt = env.prompt_text(0)
    expected_text = conversation_text(rm_tok, CONVERSATIONS[1], "good")
    assert expected_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\ngood<|eot_id|>")
    ids = rm.encode([prompt], ["good"])
    assert ids == [rm_tok(expected_text, add_special_tokens=False)["input_ids"]]
    assert rm_tok.convert_ids_to_tokens(ids[0][:2]) == ["<|begin_of_text|>", "<|start_header_id|>"]

    env.reset(seed=0)
    env.step(chat_tok.convert_tokens_to_ids("good"))
    _, _, terminated, _, info = env.step(chat_tok.convert_tokens_to_ids("<|im_end|>"))
    assert terminated
    with torch.no_grad():
        direct = sequence_scores(rm.model, torch.tensor(ids), torch.ones(1, len(ids[0]), dtype=torch.long))
    assert info["completion"]["score"] == pytest.approx(float(direct[0]), abs=1e-6)
    # Plain text prompts are still scored as prompt + response text.
    assert rm.encode(["the film was"], [" good"]) == [rm_tok("the film was good")["input_ids"]]
