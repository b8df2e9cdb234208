#!/usr/bin/env bash
# One device call: GPU tests, then the throughput workloads and the decode microbenchmark.
# Usage (repo root, on the GPU machine): OUT=/some/dir bash benchmarks/gpu_run.sh [tests|w1|8b|kernel|moe|moe-tput|moe-tpot]...
# (one part per device call keeps each under the 10-minute limit; moe-tput vs 8b: MoE vs dense)
# Two GPUs (issue 9): OUT=/some/dir bash benchmarks/gpu_run.sh tp-tests tp tp-small
set -u
OUT=${OUT:-/tmp/pagedllm-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
parts=${*:-tests w1 8b kernel}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
for part in $parts; do
  case $part in
    tests) timeout 240 python -m pytest tests/gpu -q -p no:cacheprovider \
             --ignore=tests/gpu/test_gpu_tensor_parallel.py 2>&1 \
             | tee "$OUT/gpu_tests.log" | tail -15 ;;
    w1) timeout 300 python benchmarks/throughput.py --preset qwen2.5-0.5b --device cuda \
          --num-prompts 256 --input-len 100 1024 --output-len 100 1024 \
          --hf-num-prompts 32 --json "$OUT/w1.json" 2>&1 | tee "$OUT/w1.log" | tail -8 ;;
    8b) timeout 300 python benchmarks/throughput.py --preset llama-3-8b --device cuda \
          --num-prompts 1000 --input-len 256 256 --output-len 256 256 \
          --hf-num-prompts 64 --json "$OUT/llama8b.json" 2>&1 | tee "$OUT/llama8b.log" | tail -8 ;;
    moe) timeout 500 python -m pytest tests/gpu/test_fused_moe.py tests/gpu/test_gpu_model_families.py \
           -q -p no:cacheprovider 2>&1 | tee "$OUT/moe_tests.log" | tail -5 ;;
    moe-tput) timeout 500 python benchmarks/throughput.py --preset qwen3-30b-a3b --device cuda \
           --num-prompts 1000 --input-len 256 256 --output-len 256 256 --skip-hf \
           --json "$OUT/qwen3_30b_a3b.json" 2>&1 | tee "$OUT/qwen3_30b_a3b.log" | tail -4 ;;
    moe-tpot) timeout 400 python benchmarks/moe_decode.py --preset qwen3-30b-a3b \
           --json "$OUT/qwen3_30b_a3b_tpot.json" 2>&1 | tee "$OUT/qwen3_30b_a3b_tpot.log" | tail -3 ;;
    kernel) timeout 120 python benchmarks/kernel_decode.py 2>&1 | tee "$OUT/kernel.log" | tail -12 ;;
    tp-tests) timeout 400 python -m pytest tests/gpu/test_gpu_tensor_parallel.py -q -p no:cacheprovider \
                2>&1 | tee "$OUT/tp_tests.log" | tail -15 ;;
    tp) for n in 1 2; do
          timeout 280 python benchmarks/throughput.py --preset llama-3-8b --device cuda \
            --num-prompts 1000 --input-len 256 256 --output-len 256 256 --skip-hf \
            --tensor-parallel-size $n --json "$OUT/llama8b_tp$n.json" 2>&1 \
            | tee "$OUT/llama8b_tp$n.log" | tail -3
        done
        python -c "import json, sys; r = [json.load(open(f'$OUT/llama8b_tp{n}.json'))['results'][0]['output_tok_s'] for n in (1, 2)]; print(f'TP=1 {r[0]:.0f} out tok/s, TP=2 {r[1]:.0f} out tok/s, ratio {r[1] / r[0]:.2f}x')" \
          2>&1 | tee "$OUT/tp_ratio.txt" ;;
    tp-small) for n in 1 2; do  # few concurrent requests: per-token latency bound
          timeout 150 python benchmarks/throughput.py --preset llama-3-8b --device cuda \
            --num-prompts 8 --max-num-seqs 8 --input-len 256 256 --output-len 512 512 --skip-hf \
            --tensor-parallel-size $n --json "$OUT/llama8b_small_tp$n.json" 2>&1 \
            | tee "$OUT/llama8b_small_tp$n.log" | tail -3
        done ;;
  esac
done
