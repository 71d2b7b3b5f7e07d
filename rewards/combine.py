"""Llama 2's combination of a helpfulness and a safety reward model into one reward.

Llama 2 (Touvron et al. 2023, section 3.2.3, "RL with PPO") trains two reward models, helpfulness
``R_h`` and safety ``R_s``, whose sigmoid outputs lie in (0, 1), and rewards the policy with

    R_c = R_s   if is_safety(prompt) or R_s < 0.15   else   R_h
    R   = WHITEN(LOGIT(R_c))                                (the env subtracts beta * KL itself)

Prompts tagged as safety-relevant are always judged by the safety model; any other response the safety
model finds unsafe (0.15 was picked for a precision of 0.89 and recall of 0.55 on Meta Safety) is judged
by it as well, so an unsafe answer cannot earn a high helpfulness reward.

Our reward models output the logit itself, so ``LOGIT(R_c)`` is simply the raw score of the selected model
(``logit(sigmoid(x)) == x``; we skip the round trip, which loses precision for large ``|x|``). The
threshold is compared on the sigmoid scale, as in the paper.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from llm_env.reward import check_scores
from rewards.model import RewardModel, ScoreStats, load_reward_model

__all__ = ["Llama2Reward", "Llama2Scores", "llama2_select"]

TextScorer = Callable[[Sequence[str], Sequence[str]], Any]


def llama2_select(
    helpfulness: torch.Tensor, safety: torch.Tensor, is_safety: torch.Tensor, threshold: float = 0.15
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 2's selection rule on raw (logit) scores.

    Args:
        helpfulness, safety: ``(n,)`` logits of the two models.
        is_safety: ``(n,)`` bool, whether each prompt is tagged as safety-relevant.
        threshold: safety threshold on the sigmoid scale.

    Returns:
        ``(LOGIT(R_c), use_safety)``: the logit of the selected score and whether the safety model was
        selected, both ``(n,)``.
    """
    use_safety = is_safety | (torch.sigmoid(safety) < threshold)
    return torch.where(use_safety, safety, helpfulness), use_safety


class Llama2Scores(NamedTuple):
    """The pieces of a :class:`Llama2Reward` evaluation, all ``(n,)`` on one device."""

    reward: torch.Tensor  # WHITEN(LOGIT(R_c)), what the environment receives
    logit: torch.Tensor  # LOGIT(R_c), the selected raw score
    use_safety: torch.Tensor  # bool: the safety model was selected
    safety: torch.Tensor  # raw safety score of every response
    helpfulness: torch.Tensor  # raw helpfulness score, NaN where it was not needed


class Llama2Reward:
    """A helpfulness and a safety reward model combined as in Llama 2, usable as the env's ``reward=``.

    Args:
        helpfulness: the helpfulness model: a :class:`RewardModel`, a directory saved by one, or any text
            scorer returning logits (with a ``stats`` attribute for ``whiten="selected"``).
        safety: the safety model, likewise.
        is_safety: predicate ``prompt -> bool`` marking safety-relevant prompts.
        safety_tag: alternatively, a substring (e.g. ``"[safety]"``) whose presence in a prompt marks it.
            With neither, only the threshold rule selects the safety model.
        threshold: the safety threshold on the sigmoid scale (Llama 2: 0.15).
        whiten: how ``WHITEN`` is done:

            * ``"selected"`` (default): each score is whitened with the statistics (mean and std on its own
              training data) of the model it came from. The two models are trained separately, so their
              logits have unrelated offsets and scales; whitening each with its own statistics puts both
              on a zero-mean, unit-variance scale before they are mixed in one reward stream, which is
              what keeps the reward comparable across the two branches and balanced against the KL term.
            * a :class:`ScoreStats`: ``(LOGIT(R_c) - mean) / std`` with statistics you measured, e.g. on the
              initial policy's samples (Ziegler et al. 2019 normalise the reward that way).
            * ``"none"``: return ``LOGIT(R_c)`` unwhitened.
        device: where to load models given as paths.

    Example:
        >>> reward = Llama2Reward("rm-helpful/", "rm-safe/", safety_tag="[safety]")  # doctest: +SKIP
        >>> env = llm_env.TextGenEnv(prompts=..., reference=..., reward=reward)  # doctest: +SKIP
    """

    def __init__(
        self,
        helpfulness: RewardModel | TextScorer | str | os.PathLike,
        safety: RewardModel | TextScorer | str | os.PathLike,
        *,
        is_safety: Callable[[str], bool] | None = None,
        safety_tag: str | None = None,
        threshold: float = 0.15,
        whiten: Literal["selected", "none"] | ScoreStats = "selected",
        device: torch.device | str | None = None,
    ) -> None:
        if is_safety is not None and safety_tag is not None:
            raise ValueError("pass either is_safety (a predicate) or safety_tag (a substring), not both")
        if safety_tag is not None and not safety_tag:
            raise ValueError("safety_tag must be a non-empty string (every prompt contains the empty string)")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a probability on the sigmoid scale, in (0, 1); got {threshold}")
        if not (isinstance(whiten, ScoreStats) or whiten in ("selected", "none")):
            raise ValueError(f"whiten must be 'selected', 'none' or a ScoreStats, got {whiten!r}")
        self.helpfulness = _as_scorer(helpfulness, device)
        self.safety = _as_scorer(safety, device)
        if whiten == "selected":
            for name, model in (("helpfulness", self.helpfulness), ("safety", self.safety)):
                if not isinstance(getattr(model, "stats", None), ScoreStats):
                    raise ValueError(
                        f"whiten='selected' needs the {name} model's score statistics (a ScoreStats in its "
                        "`stats`): train it with rewards.train_reward_model, call "
                        "calibrate(prompts, responses), "
                        "or pass whiten=ScoreStats(mean, std) or whiten='none'"
                    )
        self.is_safety = is_safety
        self.safety_tag = safety_tag
        self.threshold = threshold
        self.whiten = whiten

    def safety_mask(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(n,)`` bool: which prompts are safety-relevant (by predicate or tag)."""
        if self.is_safety is not None:
            flags = [bool(self.is_safety(p)) for p in prompts]
        elif self.safety_tag is not None:
            flags = [self.safety_tag in p for p in prompts]
        else:
            flags = [False] * len(prompts)
        return torch.tensor(flags, dtype=torch.bool)

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> Llama2Scores:
        """Score the texts and return the reward with the pieces it was made from.

        The helpfulness model only scores the responses it is selected for.
        """
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"got {n} prompts but {len(responses)} responses")
        safety = check_scores(self.safety(prompts, responses), n, "the safety reward model")
        device = safety.device
        tagged = self.safety_mask(prompts).to(device)
        helpfulness = torch.full((n,), float("nan"), device=device)
        need = (~(tagged | (torch.sigmoid(safety) < self.threshold))).nonzero().flatten()  # (m,)
        if need.numel():
            rows = need.tolist()
            scores = self.helpfulness([prompts[i] for i in rows], [responses[i] for i in rows])
            helpfulness[need] = check_scores(scores, len(rows), "the helpfulness reward model").to(device)
        logit, use_safety = llama2_select(helpfulness, safety, tagged, self.threshold)
        return Llama2Scores(self._whiten(logit, use_safety), logit, use_safety, safety, helpfulness)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.components(prompts, responses).reward

    def _whiten(self, logit: torch.Tensor, use_safety: torch.Tensor) -> torch.Tensor:
        if isinstance(self.whiten, ScoreStats):
            return self.whiten.whiten(logit)
        if self.whiten == "none":
            return logit
        h, s = self.helpfulness.stats, self.safety.stats
        mean = torch.where(use_safety, s.mean, h.mean)
        std = torch.where(use_safety, s.std, h.std)
        return (logit - mean) / std


def _as_scorer(model: RewardModel | TextScorer | str | os.PathLike, device: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        return load_reward_model(model, device=device)
    if not callable(model):
        raise TypeError(
            f"a reward model must be a RewardModel, a text scorer or a path, got {type(model).__name__}"
        )
    return model
