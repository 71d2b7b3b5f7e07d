#!/usr/bin/env bash
# The CPU measurements of BENCHMARKS.md: 2 threads, fp32, random weights, everything in one process per
# configuration. Run from the repository root on an otherwise idle machine: bash rlhf_bench/throughput/cpu.sh
set -euo pipefail
out=${OUT:-rlhf_bench/throughput/results}
mkdir -p "$out"

# The CPU target: GPT-2 6 x 384 (vocab 50257), batch 16, prompt 32, 48 new tokens.
llm-env bench-throughput --shape gpt2-small --batch-size 16 --prompt-length 32 --new-tokens 48 \
    --dtype float32 --device cpu --threads 2 --repeats 5 --warmup 1 \
    --json "$out/cpu-gpt2-small-b16-n48.json" | tee "$out/cpu-gpt2-small-b16-n48.md"

# c/d at 128 new tokens (the no-cache loop re-encodes up to 160 tokens per step: one timed run).
llm-env bench-throughput --shape gpt2-small --batch-size 16 --prompt-length 32 --new-tokens 128 \
    --dtype float32 --device cpu --threads 2 --repeats 3 --warmup 1 --no-cache-repeats 1 \
    --variants generate monolithic monolithic-greedy env env-fused no-cache \
    --json "$out/cpu-gpt2-small-b16-n128.json" | tee "$out/cpu-gpt2-small-b16-n128.md"

python rlhf_bench/throughput/check_targets.py "$out"/cpu-*.json
