"""``python -m rlhf_bench`` is the ``llm-env`` command (also under ``torchrun -m rlhf_bench``)."""

from rlhf_bench.cli import main

raise SystemExit(main())
