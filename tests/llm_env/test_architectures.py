"""The architecture conformance matrix, environment half: for every tiny architecture of
:data:`llm_env.tiny.TINY_ARCHITECTURES` the environment's per-token reference log-probabilities (and a fused
LoRA policy's) equal one full forward pass over the context, with sliding windows shorter than an episode,
prompts of different lengths, rows finishing at different steps and autoresets. The agents' half (sampler,
PPO and GRPO updates) is ``tests/agents/test_architectures.py``.
"""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import llm_env
from llm_env import TokenActions, UnsupportedArchitectureError
from llm_env.attention import FULL, SLIDING, attention_layout
from llm_env.decoding import IncrementalLM
from llm_env.tiny import TINY_ARCHITECTURES, numbered_tokenizer, tiny_causal_lm

ARCHITECTURES = sorted(TINY_ARCHITECTURES)
VOCAB = 48
EOS = 1
PROMPTS = ["w5 w6", "w7 w8 w9 w10 w11 w12", "w13 w14 w15", "w20", "w21 w22 w23 w24 w25"]
NEW_TOKENS = 11  # longer than every window (4), so decoding crosses it
STEPS = 30


@pytest.fixture(scope="module")
def tok():
    return numbered_tokenizer(VOCAB)


def zero_reward(prompts, responses):
    return [0.0] * len(responses)


def next_token_logprobs(model, contexts: list[list[int]]) -> torch.Tensor:
    """(B, V) log-probabilities of the token after each context, from one right-padded full forward pass
    (no cache: the model builds its own causal and sliding-window masks)."""
    width = max(map(len, contexts))
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    mask = torch.zeros(len(contexts), width, dtype=torch.long)
    for i, context in enumerate(contexts):
        ids[i, : len(context)] = torch.tensor(context)
        mask[i, : len(context)] = 1
    last = torch.tensor([len(c) - 1 for c in contexts])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits[torch.arange(len(contexts)), last], dim=-1)


def contexts_of(obs) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(obs["input_ids"], obs["attention_mask"])]


def random_actions(rng: np.random.Generator, batch: int) -> torch.Tensor:
    """Word tokens, with a stop token one time in six, so that rows finish at different steps."""
    tokens = rng.integers(3, VOCAB, size=batch)
    tokens[rng.random(batch) < 1 / 6] = EOS
    return torch.as_tensor(tokens)


def run_lockstep(envs, policy_logprobs, reference, rng) -> int:
    """Step ``envs`` with the same actions; check every stepping row's reward against the full forward of
    ``reference`` over the row's context. Returns the number of finished episodes."""
    observations = [env.reset(seed=0)[0] for env in envs]
    batch = envs[0].num_envs
    resetting = np.zeros(batch, dtype=bool)
    finished = 0
    for _ in range(STEPS):
        contexts = contexts_of(observations[0])
        for obs in observations[1:]:
            assert contexts_of(obs) == contexts
        tokens = random_actions(rng, batch)
        logp = policy_logprobs(observations[0], contexts)  # (B, V) or None
        chosen = logp.gather(1, tokens[:, None]).squeeze(1) if logp is not None else torch.zeros(batch)
        expected = next_token_logprobs(reference, contexts).gather(1, tokens[:, None]).squeeze(1)
        for i, env in enumerate(envs):
            observations[i], reward, terminated, truncated, _ = env.step(TokenActions(tokens, chosen))
            stepping = ~resetting
            # k1 with beta = 1 and a zero score: r_t = -(log pi - log pi_ref) on every stepping row
            torch.testing.assert_close(
                reward[stepping], (expected - chosen)[stepping], atol=1e-4, rtol=0, msg=f"env {i}"
            )
            assert (reward[resetting] == 0).all()
        ended = (terminated | truncated).cpu().numpy()
        finished += int(ended.sum())
        resetting = ended
    return finished


def make_env(tok, reference, **options):
    return llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=PROMPTS,
        tokenizer=tok,
        reference=reference,
        reward=zero_reward,
        kl_coef=1.0,
        kl_estimator="k1",
        max_new_tokens=NEW_TOKENS,
        device="cpu",
        **options,
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reference_logprobs_equal_a_full_forward(arch, tok):
    model = tiny_causal_lm(arch, tok, seed=0)
    finished = run_lockstep([make_env(tok, model)], lambda obs, ctx: None, model, np.random.default_rng(0))
    assert finished >= 6  # several episodes, hence autoresets, in every row


def linear_layers(model) -> list[str]:
    """The names of the model's linear layers but the output head (peft's "all-linear" would also put
    LoRA on the fused expert weights of a mixture of experts, which fusing refuses: see below)."""
    from transformers.pytorch_utils import Conv1D

    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))
    }
    return sorted(names - {"lm_head", "embed_out"})


def lora(model, seed: int, target_modules=None, **options):
    """A LoRA policy with non-zero adapters (as after training), so that policy != reference."""
    torch.manual_seed(seed)
    gpt2 = model.config.model_type == "gpt2"  # Conv1D weights are stored transposed
    config = LoraConfig(
        r=4,
        target_modules=target_modules or linear_layers(model),
        fan_in_fan_out=gpt2,
        init_lora_weights=False,
        **options,
    )
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fused_lora_decoding_matches_unfused_and_a_full_forward(arch, tok):
    policy = lora(tiny_causal_lm(arch, tok, seed=0), seed=1)
    fused = make_env(tok, llm_env.AdapterDisabled(policy, fuse=True))
    unfused = make_env(tok, llm_env.AdapterDisabled(policy, fuse=False))

    def fused_policy_logprobs(obs, contexts):
        logits = fused.policy_logits(obs, policy)
        assert logits is not None
        logp = torch.log_softmax(logits, dim=-1)
        torch.testing.assert_close(logp, next_token_logprobs(policy, contexts), atol=1e-4, rtol=0)
        return logp

    base = _Frozen(policy)  # the reference of the full forward: the base model, adapters off
    run_lockstep([fused, unfused], fused_policy_logprobs, base, np.random.default_rng(1))


class _Frozen(torch.nn.Module):
    """The adapter-disabled base of a peft model as a callable model (for the full-forward reference)."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)


def test_fusing_refuses_lora_on_expert_parameters(tok):
    policy = lora(tiny_causal_lm("mixtral", tok), seed=1, target_modules="all-linear")
    with pytest.raises(ValueError, match="cannot be switched off for half of a batch; use fuse=False"):
        make_env(tok, llm_env.AdapterDisabled(policy, fuse=True))
    make_env(tok, llm_env.AdapterDisabled(policy, fuse=False))  # unfused, the reference is exact


@pytest.mark.parametrize(
    ("arch", "kinds", "window", "mapping"),
    [
        ("llama", (FULL,), None, False),
        ("mistral", (SLIDING,), 4, False),
        ("qwen2-sliding", (FULL, SLIDING), 4, True),
        ("gemma2", (SLIDING, FULL), 4, True),
        ("gemma3", (SLIDING, FULL), 4, True),
    ],
)
def test_attention_layouts(arch, kinds, window, mapping, tok):
    layout = attention_layout(tiny_causal_lm(arch, tok))
    assert (layout.kinds, layout.window, layout.mapping) == (kinds, window, mapping)


def test_a_sliding_window_changes_the_logprobs_it_must_reproduce(tok):
    """The sliding-window cases above test something: the same weights with a window of 4 and without one
    give different log-probabilities past the window (the cache without the window was wrong by ~0.1)."""
    windowed = tiny_causal_lm("mistral", tok, seed=0)
    full = tiny_causal_lm("mistral", tok, seed=0, sliding_window=None)
    context = [[5 + i % 40 for i in range(12)]]
    gap = (next_token_logprobs(windowed, context) - next_token_logprobs(full, context)).abs().max()
    assert gap > 1e-2


def _falcon_alibi(tok):
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True
    )
    return FalconForCausalLM(config), "ALiBi"


def _qwen3_next(tok):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        linear_num_value_heads=2,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
    )
    return Qwen3NextForCausalLM(config), "linear_attention"


def _llama4_chunked(tok):
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        attention_chunk_size=8,
    )
    return Llama4ForCausalLM(config), "chunked attention"


@pytest.mark.parametrize("build", [_falcon_alibi, _qwen3_next, _llama4_chunked])
def test_architectures_it_cannot_decode_exactly_are_refused_by_name(build, tok):
    model, feature = build(tok)
    name = type(model).__name__
    with pytest.raises(UnsupportedArchitectureError, match=rf"{name}.*{feature}"):
        IncrementalLM(model, 2, 16)
    with pytest.raises(UnsupportedArchitectureError, match=name):  # the environment refuses it when built
        make_env(tok, model)


def test_a_layer_that_bypasses_the_cache_is_caught_at_the_first_prefill(tok):
    model = tiny_causal_lm("llama", tok)
    lm = IncrementalLM(model, 1, 8)
    layer = lm.cache.layers[1]
    layer.update = lambda keys, values, *args, **kwargs: (keys, values)  # attends, never writes
    with pytest.raises(UnsupportedArchitectureError, match=r"layers \[1\] of 2"):
        lm.prefill(np.array([0]), torch.tensor([[5, 6, 7]]), np.array([3]))
