#!/usr/bin/env bash
# The CPU measurements of docs/results/throughput.md: fp32, random weights, everything in one process per configuration.
# Run from the repository root on an otherwise idle machine: bash rlhf_bench/throughput/cpu.sh
# The peers (trl-grpo, torchrl) need pip install -e ".[peers]"; without it they are skipped with a message.
set -euo pipefail
out=${OUT:-rlhf_bench/throughput/results}
mkdir -p "$out"

# The CPU target: GPT-2 6 x 384 (vocab 50257), batch 16, prompt 32, 48 new tokens, 2 threads.
llm-env bench-throughput --shape gpt2-small --batch-size 16 --prompt-length 32 --new-tokens 48 \
    --dtype float32 --device cpu --threads 2 --repeats 5 --warmup 1 \
    --json "$out/cpu-gpt2-small-b16-n48.json" | tee "$out/cpu-gpt2-small-b16-n48.md"

# c/d at 128 new tokens (the no-cache loop re-encodes up to 160 tokens per step: one timed run).
llm-env bench-throughput --shape gpt2-small --batch-size 16 --prompt-length 32 --new-tokens 128 \
    --dtype float32 --device cpu --threads 2 --repeats 3 --warmup 1 --no-cache-repeats 1 \
    --variants generate monolithic monolithic-greedy env env-fused no-cache \
    --json "$out/cpu-gpt2-small-b16-n128.json" | tee "$out/cpu-gpt2-small-b16-n128.md"

# Against the floor and the peers, one thread (OMP_NUM_THREADS too, for the peers' own thread pools).
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 llm-env bench-throughput --shape gpt2-small --batch-size 16 \
    --prompt-length 32 --new-tokens 48 --dtype float32 --device cpu --threads 1 --repeats 5 --warmup 1 \
    --variants floor generate monolithic env env-fused trl-grpo torchrl \
    --json "$out/cpu-peers-gpt2-small-b16-n48.json" | tee "$out/cpu-peers-gpt2-small-b16-n48.md"

# Scaling: env / floor across batch sizes 1-64 and lengths 16-512, one thread: the CPU target's shape (about
# 15 minutes when idle), then the tiny shape (2 x 64, vocab 512: 3 minutes), whose decode step is so short
# that the environment's own per-step cost shows.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m rlhf_bench.throughput.scaling --shape gpt2-small --device cpu \
    --threads 1 --batch-sizes 1 4 16 64 --new-tokens 16 64 256 512 --variants floor env \
    --repeats 3 --warmup 1 --large-tokens 4096 --large-repeats 1 --out "$out/scaling-cpu"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m rlhf_bench.throughput.scaling --shape tiny --device cpu \
    --threads 1 --batch-sizes 1 4 16 64 --new-tokens 16 64 256 512 --variants floor env \
    --repeats 5 --warmup 1 --large-tokens 1000000 --out "$out/scaling-cpu-tiny"

python rlhf_bench/throughput/check_targets.py "$out"/cpu-*.json
