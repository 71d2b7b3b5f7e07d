"""The peers: TRL's GRPO rollout and TorchRL's LLM rollout, each built from its library's public API on the
benchmark's own models, prompts, lengths, dtype and device.

Optional: ``pip install -e ".[peers]"`` (TRL with accelerate, TorchRL with tensordict); without them the
variants ``trl-grpo`` and ``torchrl`` are skipped with a message. Every rollout does the same work as the
environment's: B responses of exactly N sampled tokens (``min_new_tokens = max_new_tokens``, pure sampling
at the benchmark's temperature: no top-k, no top-p), the reference log-probability of every sampled token,
and one reward-model score per response; each returns them as a
:class:`~rlhf_bench.throughput.baselines.Rollout`.

``trl-grpo`` follows ``GRPOTrainer``'s rollout step by step (trl 1.16: ``_generate_single_turn``,
``_generate_and_score_completions``, ``_get_per_token_logps_and_entropies``, ``_calculate_rewards``) with
the public pieces it is made of, and with ``GRPOConfig``'s defaults (transformers generation,
``num_iterations=1``, so no policy log-probabilities are computed during the rollout: its loss computes
them):

1. the prompt texts are tokenized by the tokenizer (``_tokenize_prompts``) and left-padded with ``trl``'s
   ``pad``;
2. the policy samples with ``generate`` inside ``trl.models.unwrap_model_for_generation``, under the
   ``GenerationConfig`` GRPO builds (``top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0``, the
   temperature) plus ``generation_kwargs={"min_new_tokens": N}``, GRPO's documented way to pass extra
   generation options;
3. the completions are cut at the first EOS (none here), turned into lists and decoded, as GRPO does;
4. the reference log-probabilities of the completion tokens come from one forward of the reference over
   the padded prompt + completion batch through ``trl``'s fused LM head (``add_fused_lm_head``, as
   ``GRPOTrainer`` patches its reference, then ``model(..., labels=..., fused_lm_head=True).log_probs``);
   off Triton devices it scores every position in chunks of the vocabulary;
5. the reward model reads the re-tokenized texts, prompt and completion joined (GRPO joins ``p + c``; the
   word-level tokenizer's decode has no leading space, so a space joins them here) and returns
   ``logits[:, 0]`` under ``torch.inference_mode``.

Left out: the group advantages, the metrics and the cross-process gathers of ``GRPOTrainer`` (one process
here), which would only add to its time.

``torchrl`` is TorchRL's LLM stack (torchrl 0.14): a ``ChatEnv`` in ``"tokens"`` mode (its chat template
renders the message content alone, so a prompt is the same P tokens), a ``TransformersWrapper`` that
generates (``return_log_probs=True``: the sampled tokens' log-probabilities from ``generate``'s logits), and
two transforms of the environment's step:

1. ``KLRewardTransform`` with the reference (a ``TransformersWrapper`` with ``generate=False``: one forward
   over the full prompt + response batch and a log-softmax cross-entropy at every position), which writes
   the reference log-probabilities of the sequence (prompt positions masked) and the per-token KL
   ``log pi - log pi_ref``; ``add_to_reward=False``, since ``ChatEnv`` writes no reward for it to add to
   (the per-token reward ``-beta KL`` plus the score on the last token is assembled after the step);
2. a ``ModuleTransform`` running ``HFRewardModelWrapper`` (``torchrl.modules.llm.trl_interop``) on the new
   observation's tokens, one score per sequence.

Two bridges that TorchRL 0.14 needs, both negligible in time: tokens-mode generation reports the
log-probabilities of the response only, while ``KLRewardTransform`` reads them over the full sequence, so
the response's are written after P zeros (the prompt positions it masks); and the reference model is wrapped
in :class:`_KeywordForward`, because the wrapper passes the attention mask positionally (GPT-2 takes it as
``past_key_values``) and its generation keywords to the forward pass. ``TransformersWrapper`` also drops
``min_new_tokens`` from its ``generate_kwargs``, so the policy model's own ``generation_config`` carries it.
Observed and left as TorchRL computes it: the log-probability it reports for the first response token is 0
(``_log_probs_generate`` zeroes column 0), so its first KL term is off; and a sampled token equal to the pad
id is masked out of the reference forward.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from typing import Any

import torch
from torch import nn

from rlhf_bench.throughput.baselines import Rollout
from rlhf_bench.throughput.models import Setup

__all__ = ["PEER_PACKAGES", "TRLGRPORollout", "TorchRLRollout", "missing_packages", "peer_versions"]

PEER_PACKAGES: dict[str, tuple[str, ...]] = {
    "trl-grpo": ("trl", "accelerate"),
    "torchrl": ("torchrl", "tensordict"),
}
"""The packages each peer variant imports (the ``peers`` extra of ``pyproject.toml`` installs them)."""

CONTENT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""A chat template rendering the messages' content alone: ChatEnv's prompt is then the prompt's P tokens."""


def missing_packages(variant: str) -> list[str]:
    """The packages ``variant`` needs that are not installed (none for the project's own variants)."""
    return [name for name in PEER_PACKAGES.get(variant, ()) if importlib.util.find_spec(name) is None]


def peer_versions() -> dict[str, str]:
    """Installed versions of the peers' packages (the report records them)."""
    out = {}
    for name in sorted({name for names in PEER_PACKAGES.values() for name in names}):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class TRLGRPORollout:
    """TRL's GRPO rollout on the benchmark's models (see the module docstring for each step)."""

    def __init__(self, setup: Setup, policy: nn.Module, reference: nn.Module, reward: nn.Module) -> None:
        from accelerate import Accelerator
        from transformers import GenerationConfig
        from trl.trainer.utils import add_fused_lm_head

        s = setup.settings
        self.setup = setup
        self.tokenizer = setup.tokenizer
        self.prompts = setup.prompt_texts[: s.batch_size]
        self.policy, self.reference, self.reward = policy, reference, reward
        self.accelerator = Accelerator(cpu=setup.device.type == "cpu")
        add_fused_lm_head(reference, temperature=s.temperature)  # as GRPOTrainer patches its reference
        self.eos_token_ids = [self.tokenizer.eos_token_id]
        # GRPOTrainer's generation_kwargs under GRPOConfig's defaults, plus {"min_new_tokens": N}.
        self.generation_kwargs = {
            "max_new_tokens": s.new_tokens,
            "do_sample": True,
            "pad_token_id": self.tokenizer.pad_token_id,
            "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.eos_token_ids,
            "temperature": s.temperature,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": None,
            "repetition_penalty": 1.0,
            "cache_implementation": None,
            "min_new_tokens": s.new_tokens,
        }
        self.generation_config = GenerationConfig(**self.generation_kwargs, disable_compile=True)

    def __call__(self) -> Rollout:
        from trl.models import unwrap_model_for_generation
        from trl.trainer.utils import pad

        tokenizer, device = self.tokenizer, self.setup.device
        pad_id = tokenizer.pad_token_id
        # _tokenize_prompts and _generate_single_turn
        prompt_tensors = [torch.tensor(ids) for ids in tokenizer(text=self.prompts)["input_ids"]]
        prompt_ids = pad(prompt_tensors, padding_value=pad_id, padding_side="left").to(device)
        prompt_mask = pad([torch.ones_like(t) for t in prompt_tensors], padding_value=0, padding_side="left")
        prompt_mask = prompt_mask.to(device)
        with (
            unwrap_model_for_generation(
                self.policy, self.accelerator, generation_kwargs=self.generation_kwargs
            ) as model,
            torch.no_grad(),
        ):
            sequences = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
            )
        completion = sequences[:, prompt_ids.size(1) :]
        is_eos = torch.isin(completion, torch.tensor(self.eos_token_ids, device=device))
        eos_idx = torch.full((is_eos.size(0),), is_eos.size(1), dtype=torch.long, device=device)
        eos_idx[is_eos.any(dim=1)] = is_eos.int().argmax(dim=1)[is_eos.any(dim=1)]
        keep = torch.arange(is_eos.size(1), device=device)[None, :] <= eos_idx[:, None]
        completion_lists = [c[m].tolist() for c, m in zip(completion.cpu(), keep.cpu(), strict=True)]
        completions = tokenizer.batch_decode(completion_lists, skip_special_tokens=True)
        # _generate_and_score_completions: back to padded tensors, the reference's log-probabilities
        completion_tensors = [torch.tensor(ids) for ids in completion_lists]
        completion_ids = pad(completion_tensors, padding_value=pad_id, padding_side="right").to(device)
        completion_mask = pad([torch.ones_like(t) for t in completion_tensors], padding_value=0).to(device)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + N)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        keep_last = completion_ids.size(1)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-keep_last] = -100  # only the completion tokens are scored
        with torch.no_grad():
            out = self.reference(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True
            )
        ref_logprobs = out.log_probs[:, -keep_last:]  # (B, N)
        # _calculate_rewards, a reward model: texts in, one score per completion
        texts = [p + " " + c for p, c in zip(self.prompts, completions, strict=True)]
        inputs = tokenizer(
            text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        ).to(device)
        with torch.inference_mode():
            scores = self.reward(**inputs).logits[:, 0]
        return Rollout(prompt_ids, completion_ids, ref_logprobs, scores)


class _KeywordForward(nn.Module):
    """``model(input_ids, attention_mask)`` by keyword: TorchRL 0.14's ``TransformersWrapper`` passes the mask
    positionally (GPT-2's second parameter is ``past_key_values``) and its generation keywords along."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


class TorchRLRollout:
    """TorchRL's LLM rollout on the benchmark's models (see the module docstring for each step)."""

    def __init__(self, setup: Setup, policy: nn.Module, reference: nn.Module, reward: nn.Module) -> None:
        from torchrl.data import Unbounded
        from torchrl.envs.llm import ChatEnv, KLRewardTransform
        from torchrl.envs.transforms import ModuleTransform
        from torchrl.modules.llm import TransformersWrapper
        from torchrl.modules.llm.trl_interop import HFRewardModelWrapper

        s = setup.settings
        self.setup = setup
        tokenizer = copy.deepcopy(setup.tokenizer)
        tokenizer.chat_template = CONTENT_TEMPLATE
        policy.generation_config.min_new_tokens = s.new_tokens  # the wrapper drops it from generate_kwargs
        self.policy = TransformersWrapper(
            policy,
            tokenizer=tokenizer,
            input_mode="tokens",
            generate=True,
            return_log_probs=True,
            pad_output=True,
            device=setup.device,
            generate_kwargs={
                "max_new_tokens": s.new_tokens,
                "do_sample": True,
                "temperature": s.temperature,
                "top_k": None,  # None, not absent: transformers would apply its default top-k of 50
                "top_p": None,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
        )
        ref = TransformersWrapper(
            _KeywordForward(reference),
            tokenizer=tokenizer,
            input_mode="tokens",
            generate=False,
            return_log_probs=True,
            pad_output=True,
            device=setup.device,
        )

        def with_score(spec: Any) -> Any:
            spec["score"] = Unbounded(shape=spec.shape, device=spec.device)
            return spec

        scorer = HFRewardModelWrapper(
            reward,
            token_key=("tokens", "prompt"),
            attention_mask_key=None,
            reward_key="score",
            inference_mode=True,
        )
        env = ChatEnv(
            input_mode="tokens",
            batch_size=(s.batch_size,),
            tokenizer=tokenizer,
            template_kwargs={"chat_template": CONTENT_TEMPLATE},
            device=setup.device,
        )
        env = env.append_transform(KLRewardTransform(ref, coef=s.kl_coef, add_to_reward=False))
        self.env = env.append_transform(
            ModuleTransform(module=scorer, no_grad=True, observation_spec_transform=with_score)
        )
        self.prompts = setup.prompt_texts[: s.batch_size]

    def __call__(self) -> Rollout:
        from tensordict import TensorDict

        s = self.setup.settings
        prompt_length = s.prompt_length
        with torch.no_grad():
            td = self.env.reset(TensorDict(query=self.prompts, batch_size=(s.batch_size,)))
            td = self.policy(td)
            response_logprobs = td["log_probs", "response"]  # (B, N)
            td["log_probs", "full"] = torch.cat(
                [response_logprobs.new_zeros(s.batch_size, prompt_length), response_logprobs], dim=1
            )
            td = self.env.step(td)
            after = td["next"]
            kl = after["kl_penalty"][:, prompt_length:, 0]  # (B, N) log pi - log pi_ref
            scores = after["score"]
            rewards = -s.kl_coef * kl
            rewards[:, -1] += scores
        ref_logprobs = after["ref_log_probs"][:, prompt_length:, 0]
        return Rollout(td["tokens", "prompt"], td["tokens", "response"], ref_logprobs, scores)
