"""The ``llm-env`` dispatcher: every subcommand answers ``--help``, and the options are the config fields."""

import dataclasses

import pytest

from agents.cli import ENV_OPTIONS, DPORunOptions, RunOptions
from agents.dpo import DPOConfig
from agents.online_dpo import OnlineDPOConfig
from agents.ppo import PPOConfig
from agents.rejection import RejectionSamplingConfig
from llm_env import EnvConfig
from rewards.train import RewardTrainingConfig
from rlhf_bench.cli import build_parser, main
from rlhf_bench.throughput import ThroughputSettings

COMMANDS = {
    "ppo": [RunOptions, PPOConfig],
    "rejection-sampling": [RunOptions, RejectionSamplingConfig],
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


@pytest.mark.parametrize(
    "command", ["ppo", "rejection-sampling", "dpo", "online-dpo", "train-rm", "bench-throughput"]
)
def test_options_are_generated_from_the_config_dataclasses(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # argparse keeps subparsers here
    options = {flag for action in sub._actions for flag in action.option_strings}
    for cls in COMMANDS[command]:
        expected = {
            flag for flag in _flags(cls) if not flag.startswith("--sft")
        }  # nested SFT config: prefixed
        assert expected <= options, (cls.__name__, expected - options)
    if command in ("ppo", "rejection-sampling", "online-dpo"):
        assert {"--" + name.replace("_", "-") for name in ENV_OPTIONS} <= options


def test_every_device_option_defaults_to_auto():
    assert EnvConfig.__dataclass_fields__["device"].default == "auto"
    assert RunOptions.device == "auto"
    assert DPORunOptions.device == "auto"
    assert RewardTrainingConfig.device == "auto"
    assert ThroughputSettings.device == "auto"
    benchmark = build_parser()._subparsers._group_actions[0].choices["benchmark"]
    assert benchmark.get_default("device") == "auto"
