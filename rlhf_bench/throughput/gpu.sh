#!/usr/bin/env bash
# The GPU configurations of the throughput targets, one command: bash rlhf_bench/throughput/gpu.sh
# Writes one JSON report (and its Markdown table) per configuration to rlhf_bench/throughput/results/ (or $OUT) and
# checks the targets at the end. Needs one CUDA GPU with ~40 GB free (the Llama ~1B run keeps every
# variant's models resident so that their runs can be interleaved). Every configuration runs the floor (and
# the floor with CUDA graphs) and, when installed (pip install -e ".[peers]"), the peers trl-grpo and torchrl.
set -euo pipefail
out=${OUT:-rlhf_bench/throughput/results}
mkdir -p "$out"
common=(--device cuda --dtype bfloat16 --prompt-length 64 --new-tokens 128 --repeats 5 --warmup 2 --threads none)
rollouts=(floor floor-graphs generate monolithic monolithic-greedy env monolithic-lora env-lora env-fused env-graphs
    env-fused-graphs no-cache)

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
if python -c "import trl, accelerate" 2>/dev/null; then rollouts+=(trl-grpo); else echo "trl not installed: no trl-grpo"; fi
if python -c "import torchrl, tensordict" 2>/dev/null; then rollouts+=(torchrl); else echo "torchrl not installed: no torchrl"; fi

# GPT-2 124M shape, batch 64 and 256: c/b >= 1, c/d >= 10; LoRA memory and PPO update throughput.
llm-env bench-throughput --shape gpt2-124m --batch-size 64 "${common[@]}" \
    --variants "${rollouts[@]}" ppo-update lora-memory \
    --json "$out/gpu-gpt2-124m-b64.json" | tee "$out/gpu-gpt2-124m-b64.md"
llm-env bench-throughput --shape gpt2-124m --batch-size 256 "${common[@]}" --variants "${rollouts[@]}" \
    --json "$out/gpu-gpt2-124m-b256.json" | tee "$out/gpu-gpt2-124m-b256.md"

# Llama ~1B shape, batch 64, bf16.
llm-env bench-throughput --shape llama-1b --batch-size 64 "${common[@]}" \
    --variants "${rollouts[@]}" ppo-update lora-memory \
    --json "$out/gpu-llama-1b-b64.json" | tee "$out/gpu-llama-1b-b64.md"

# Scaling on the GPU: each variant / floor across batch sizes 1-256 and lengths 16-512 (GPT-2 124M shape).
python -m rlhf_bench.throughput.scaling --shape gpt2-124m --device cuda --dtype bfloat16 --threads none \
    --batch-sizes 1 8 64 256 --new-tokens 16 64 256 512 --variants floor floor-graphs env env-fused env-graphs \
    --repeats 3 --warmup 2 --large-tokens 1000000 --out "$out/scaling-gpu"  # no cell is "large": graphs warm up

python rlhf_bench/throughput/check_targets.py "$out"/gpu-*.json
