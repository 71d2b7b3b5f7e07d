"""The ``llm-env`` dispatcher: every subcommand answers ``--help``, and the options are the config fields."""

import dataclasses

import pytest

from agents.cli import ENV_OPTIONS, PG_AGENTS, DPORunOptions, RunOptions
from agents.dapo import DAPOConfig
from agents.dpo import DPOConfig
from agents.dr_grpo import DrGRPOConfig
from agents.grpo import GRPOConfig
from agents.gspo import GSPOConfig
from agents.online_dpo import OnlineDPOConfig
from agents.ppo import PPOConfig
from agents.reinforce_pp import ReinforcePPConfig
from agents.rejection import RejectionSamplingConfig
from agents.remax import ReMaxConfig
from agents.rloo import RLOOConfig
from llm_env import EnvConfig
from rewards.train import RewardTrainingConfig
from rlhf_bench.cli import build_parser, main
from rlhf_bench.throughput import ThroughputSettings

COMMANDS = {
    "ppo": [RunOptions, PPOConfig],
    "rejection-sampling": [RunOptions, RejectionSamplingConfig],
    "grpo": [RunOptions, GRPOConfig],
    "dr-grpo": [RunOptions, DrGRPOConfig],
    "dapo": [RunOptions, DAPOConfig],
    "gspo": [RunOptions, GSPOConfig],
    "rloo": [RunOptions, RLOOConfig],
    "reinforce-pp": [RunOptions, ReinforcePPConfig],
    "remax": [RunOptions, ReMaxConfig],
    "dpo": [DPORunOptions, DPOConfig],
    "online-dpo": [RunOptions, OnlineDPOConfig],
    "train-rm": [RewardTrainingConfig],
    "bench-throughput": [ThroughputSettings],
    "benchmark": [],
}


def _flags(cls):
    return {
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(f.type)
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_a_help_page(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert f"llm-env {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"benchmark"}))
def test_options_are_generated_from_the_config_dataclasses(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps subparsers here
    options = {flag for action in sub._actions for flag in action.option_strings}
    for cls in COMMANDS[command]:
        expected = {
            flag for flag in _flags(cls) if not flag.startswith("--sft")
        }  # nested SFT config: prefixed
        assert expected <= options, (cls.__name__, expected - options)
    if command in (
        "ppo",
        "rejection-sampling",
        "online-dpo",
        *PG_AGENTS,
    ):  # the critic-free configs own --kl-estimator
        assert {"--" + name.replace("_", "-") for name in ENV_OPTIONS} <= options
    if command in PG_AGENTS:
        assert {"--updates", "--total-tokens"} <= options
        assert PG_AGENTS[command][0].config_class is COMMANDS[command][1]


def test_every_device_option_defaults_to_auto():
    assert EnvConfig.__dataclass_fields__["device"].default == "auto"
    assert RunOptions.device == "auto"
    assert DPORunOptions.device == "auto"
    assert RewardTrainingConfig.device == "auto"
    assert ThroughputSettings.device == "auto"
    benchmark = build_parser()._subparsers._group_actions[0].choices["benchmark"]
    assert benchmark.get_default("device") == "auto"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "0"], "argument --nproc: must be an integer >= 1, got 0"),
        (["--nproc", "-2"], "argument --nproc: must be an integer >= 1, got -2"),
        (["--seeds", "0"], "argument --seeds: must be an integer >= 1, got 0"),
        (["--seeds", "-1"], "argument --seeds: must be an integer >= 1, got -1"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
        (["--nproc", "two"], "argument --nproc: must be an integer >= 1, got 'two'"),
    ],
)
def test_benchmark_rejects_out_of_range_numbers_with_a_usage_error(argv, message, capsys):
    """A bad count is a one-line usage error (exit status 2) before anything runs, not a traceback from
    deep inside the run."""
    with pytest.raises(SystemExit) as stop:
        main(["benchmark", "--tiny", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"llm-env benchmark: error: {message}"
    assert "Traceback" not in err
