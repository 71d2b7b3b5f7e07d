"""Where each KL estimator may be paid: its expected policy gradient against the exact grad KL(pi || pi_ref).

A toy categorical policy pi = softmax(theta) and a fixed reference; expectations are exact sums over every
outcome (no sampling). Paid **in the reward** (the environment's ``-beta * k(d)``, a number without gradient),
the policy gradient of the expected penalty is the score-function one, ``E_pi[k(d) grad log pi]`` (there is
no pathwise part: the reward is computed from detached log-probabilities). Paid **in the loss** (``PGAgent``
adds ``kl_penalty(logp, ref_logp, k)`` to its loss), autograd differentiates through ``log pi`` of the sampled
outcomes: ``E_pi[grad k(log pi - log pi_ref)]``. The sound combinations, k1 in the reward and k2 in the loss
(Tang & Munos 2025; http://joschu.net/blog/kl-approx.html), match; the others do not, which is why the
configs default to them and warn about the others.
"""

import argparse
import math
import warnings

import pytest
import torch

from agents.dapo import DAPOConfig
from agents.dr_grpo import DrGRPOConfig
from agents.grpo import GRPOConfig
from agents.gspo import GSPOConfig
from agents.pg import PGConfig
from agents.reinforce_pp import ReinforcePPConfig
from agents.remax import ReMaxConfig
from agents.rloo import RLOOConfig
from llm_env.config_cli import add_dataclass_arguments, dataclass_from_args
from llm_env.kl import (
    KL_ESTIMATORS,
    KL_GRADIENT_BIAS,
    UNBIASED_KL_ESTIMATOR,
    KLGradientBiasWarning,
    kl_penalty,
)

BUILTIN = ("k1", "k2", "k3")
PLACEMENTS = ("reward", "loss")
CONFIGS = (
    PGConfig,
    GRPOConfig,
    DrGRPOConfig,
    DAPOConfig,
    GSPOConfig,
    RLOOConfig,
    ReinforcePPConfig,
    ReMaxConfig,
)


def _kl(logp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)), exactly."""
    return (logp.exp() * (logp - ref)).sum()


def expected_gradient(theta: torch.Tensor, ref: torch.Tensor, estimator: str, placement: str) -> torch.Tensor:
    """The exact expected gradient wrt ``theta`` of paying ``estimator`` in ``placement`` (one "token")."""
    theta = theta.detach().requires_grad_(True)
    logp = torch.log_softmax(theta, dim=0)
    probs = logp.detach().exp()  # the sampling distribution: expectations weigh each outcome, no gradient
    if placement == "reward":
        # REINFORCE on the penalty: a detached k(d), times grad log pi (the environment's reward is a number).
        penalty = kl_penalty(logp.detach(), ref, estimator)
        surrogate = (probs * penalty * logp).sum()
    else:
        # The PG loss's term: the library's kl_penalty differentiated through logp (agents/pg.py, learn).
        surrogate = (probs * kl_penalty(logp, ref, estimator)).sum()
    (gradient,) = torch.autograd.grad(surrogate, theta)
    return gradient


def true_gradient(theta: torch.Tensor, ref: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """grad KL(pi || pi_ref) by autograd (``reverse``: grad KL(pi_ref || pi))."""
    theta = theta.detach().requires_grad_(True)
    logp = torch.log_softmax(theta, dim=0)
    (gradient,) = torch.autograd.grad(_kl(ref, logp) if reverse else _kl(logp, ref), theta)
    return gradient


# A Bernoulli policy, logits (theta, 0) at theta = 0 (p = 1/2), against a reference with q = 0.2. By hand, with
# d/dtheta log p = 1 - p = 1/2 and d/dtheta log(1 - p) = -p = -1/2:
# grad KL(pi || ref) = p (1 - p) (log(p / q) - log((1 - p) / (1 - q))) = 1/4 log(2.5 / 0.625) = ln(4) / 4;
# grad KL(ref || pi) = p - q = 0.3.
HAND = {
    ("k1", "reward"): math.log(4) / 4,  # E[d grad log p]: the KL's gradient itself
    ("k2", "reward"): math.log(4) * math.log(2.5 * 0.625) / 8,  # 1/8 (ln^2 2.5 - ln^2 0.625)
    ("k3", "reward"): math.log(4) / 4 - 0.3,  # grad KL(pi || ref) - grad KL(ref || pi)
    ("k1", "loss"): 0.0,  # E[grad log p] = 0
    ("k2", "loss"): math.log(4) / 4,  # E[d grad log p]
    ("k3", "loss"): 0.3,  # E[(1 - q/p) grad log p] = grad KL(ref || pi)
}


@pytest.mark.parametrize(("estimator", "placement"), sorted(HAND))
def test_bernoulli_gradients_by_hand(estimator, placement):
    theta = torch.tensor([0.0, 0.0], dtype=torch.float64)
    ref = torch.log(torch.tensor([0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(
        true_gradient(theta, ref)[0], torch.tensor(math.log(4) / 4, dtype=torch.float64)
    )
    gradient = expected_gradient(theta, ref, estimator, placement)
    assert float(gradient[0]) == pytest.approx(HAND[estimator, placement], abs=1e-12)
    assert float(gradient.sum()) == pytest.approx(0.0, abs=1e-12)  # softmax: the logits' gradients sum to 0


def test_every_builtin_combination_is_classified():
    """Each (estimator, placement) is either the sound one or has its bias explained (and warned about)."""
    for placement in PLACEMENTS:
        for estimator in BUILTIN:
            sound = UNBIASED_KL_ESTIMATOR[placement] == estimator
            assert sound != ((estimator, placement) in KL_GRADIENT_BIAS), (estimator, placement)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("estimator", sorted(KL_ESTIMATORS))
def test_expected_gradient_against_autograd_on_a_categorical(estimator, placement):
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=generator, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(6, generator=generator, dtype=torch.float64), dim=0)
    exact = true_gradient(theta, ref)
    assert exact.norm() > 0.1  # pi is far enough from the reference for a bias to show
    gradient = expected_gradient(theta, ref, estimator, placement)
    if UNBIASED_KL_ESTIMATOR[placement] == estimator:
        torch.testing.assert_close(gradient, exact, rtol=1e-10, atol=1e-12)
    elif (estimator, placement) in KL_GRADIENT_BIAS:
        assert (gradient - exact).norm() > 0.1 * exact.norm(), (gradient, exact)
    else:  # an estimator registered elsewhere and not analysed: nothing to assert
        pytest.skip(f"{estimator!r} has no declared soundness")
    if (estimator, placement) == ("k3", "loss"):  # DeepSeekMath's: the gradient of the other direction
        torch.testing.assert_close(gradient, true_gradient(theta, ref, reverse=True), rtol=1e-10, atol=1e-12)
    if (estimator, placement) == ("k3", "reward"):
        torch.testing.assert_close(
            gradient, exact - true_gradient(theta, ref, reverse=True), rtol=1e-10, atol=1e-12
        )


# ------------------------------------------------------------------------------- the configs' defaults
@pytest.mark.parametrize("config_class", CONFIGS)
def test_default_estimator_is_the_unbiased_one_where_the_kl_is_paid(config_class):
    with warnings.catch_warnings():
        warnings.simplefilter("error", KLGradientBiasWarning)  # the defaults never warn
        assert config_class().kl_estimator == "k1"
        assert config_class(kl_in="loss").kl_estimator == "k2"


def test_grpo_no_longer_pays_k3_by_default():
    """The audit's defect: GRPOConfig() paid k3 as a reward, a biased gradient of the KL."""
    assert GRPOConfig().kl_in == "reward" and GRPOConfig().kl_estimator == "k1"


@pytest.mark.parametrize(("estimator", "placement"), sorted(KL_GRADIENT_BIAS))
def test_biased_combinations_warn_and_say_how_to_fix_them(estimator, placement):
    sound = UNBIASED_KL_ESTIMATOR[placement]
    with pytest.warns(KLGradientBiasWarning, match=rf"biased gradient.*kl_estimator='{sound}'") as caught:
        config = GRPOConfig(kl_in=placement, kl_estimator=estimator)
    assert caught[0].filename == __file__  # it names the user's line, not the library's
    assert config.kl_estimator == estimator  # it still runs what was asked for (reproducing a paper)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KLGradientBiasWarning)
        GRPOConfig(kl_in=placement, kl_estimator=estimator, kl_coef=0.0)  # no KL paid: nothing to warn about
        GRPOConfig(kl_in=placement, kl_estimator=sound)


def test_command_line_leaves_the_estimator_to_the_placement():
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, GRPOConfig)
    choices = next(a.choices for a in parser._actions if "--kl-estimator" in a.option_strings)
    assert set(choices) == {*KL_ESTIMATORS, "none"}
    assert dataclass_from_args(GRPOConfig, parser.parse_args([])).kl_estimator == "k1"
    assert dataclass_from_args(GRPOConfig, parser.parse_args(["--kl-in", "loss"])).kl_estimator == "k2"
    explicit = parser.parse_args(["--kl-in", "loss", "--kl-estimator", "k2"])
    assert dataclass_from_args(GRPOConfig, explicit).kl_estimator == "k2"
