"""rlhf_bench: the application on top of the libraries, the ``llm-env`` command and its benchmarks.

* :mod:`rlhf_bench.leaderboard`: ``llm-env benchmark``, the offline RLHF leaderboard (a built-in task with
  a gold rater, every registered agent trained on one environment, intervals, plots and a report);
* :mod:`rlhf_bench.throughput`: ``llm-env bench-throughput``, rollout throughput of the environment against
  the monolithic pipelines it replaces, with the scripts and recorded results of ``docs/results/throughput.md``;
* :mod:`rlhf_bench.cli`: the ``llm-env`` dispatcher, to which ``agents`` and ``rewards`` add their
  subcommands.

This package imports ``llm_env``, ``agents`` and ``rewards``; none of them imports it (see ARCHITECTURE.md).
"""
