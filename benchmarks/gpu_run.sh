#!/usr/bin/env bash
# One device call: GPU tests, then the throughput workloads and the decode microbenchmark.
# First, on the development machine: bash benchmarks/device_prep.sh (wheels, tokenizer).
# Usage (repo root, on the GPU machine):
#   OUT=/some/dir bash benchmarks/gpu_run.sh [tests|w1|8b|kernel|serve|serve-c1|flash|moe|moe-tput|moe-graphs|moe-tpot|moe-kernels|so|spec|quant|quant-kernels|quant-gemv|moe-graphs-30b|quant-b1-awq|fp8-tput]...
# so (issue 16): Llama-3-8B shape, 512 requests, none / half held to 8 JSON schemas
#   (TOKENIZER_DIR=a tokenizer folder, e.g. SmolLM2's saved with save_pretrained).
# serve: served vs offline (issue 14), 0.5B at concurrency 256 and 1024 and the 8B shape at
#   256, each with 1 and 4 API servers; serve-c1: concurrency 1 (0.5B); moe-kernels (issue 19):
#   routing and grouped-GEMM tiles, then batch-1 TPOT with a kernel profile; spec: the
#   speculative-decoding GPU tests and benchmark (issue 21); flash: FLASH_ATTN against TRITON_ATTN (issue 15).
# (one part per device call keeps each under the 10-minute limit; moe-tput vs 8b: MoE vs dense)
# quant (issue 20): quantization GPU tests, then FP8 / FP8 KV / W4A16 against bf16
#   (benchmarks/quant.py; about 8 minutes in all)
# fp8-tput (issue 20): bf16 then FP8 + FP8 KV, 1000 x 256/256 with the device timeline
#   (spans, gaps, the parts of each step kind's execute, pinned host blocks created)
# quant-kernels (issue 20): each Llama-3-8B linear per path and M (benchmarks/quant_kernels.py),
#   then benchmarks/quant.py (under 8 minutes in all; no tests)
# Two GPUs (issue 9): OUT=/some/dir bash benchmarks/gpu_run.sh tp-tests tp tp-small
set -u
OUT=${OUT:-/tmp/pagedllm-out}
svo_summary() {  # one line per served run of every svo_*.json under $1
  python - "$1" <<'PY' 2>&1 | tee "$1/svo_summary.txt"
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/svo_*.json")):
    r = json.load(open(f))
    for n, s in r["served_by_api_server_count"].items():
        print(f"{f.rsplit('/', 1)[1]} ({n} API servers): offline {r['offline']['output_tok_s']:.0f}"
              f" served {s['output_tok_s']:.0f} out tok/s ({s['served_over_offline']:.2f}x); TPOT "
              f"p50 {s['median_tpot_ms']:.2f} ms vs step {r['offline_step_ms']:.2f} ms "
              f"({s['tpot_over_step']:.2f}x); TTFT mean {s['mean_ttft_ms']:.0f} ms (server "
              f"{s['server_mean_time_to_first_token_ms']:.0f}); CPU s/1k tok: front "
              f"{s['frontend_cpu_s_per_1k']:.3f} core {s['core_cpu_s_per_1k']:.3f}; errors "
              f"{s['errors']}")
PY
}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
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
    serve) svo="python benchmarks/serve_vs_offline.py --device cuda ${TOKENIZER_DIR:+--tokenizer-dir $TOKENIZER_DIR}"  # issue 14
        timeout 170 $svo --preset qwen2.5-0.5b --num-prompts 256 --input-len 512 --output-len 512 \
          --concurrency 256 --clients 8 --api-server-count 1 4 --json "$OUT/svo_05b_c256.json" \
          > "$OUT/svo_05b_c256.log" 2>&1
        timeout 190 $svo --preset qwen2.5-0.5b --num-prompts 2048 --input-len 256 --output-len 256 \
          --concurrency 1024 --clients 8 --api-server-count 1 4 --json "$OUT/svo_05b_c1024.json" \
          > "$OUT/svo_05b_c1024.log" 2>&1
        timeout 210 $svo --preset llama-3-8b --num-prompts 512 --input-len 256 --output-len 256 \
          --concurrency 256 --clients 8 --api-server-count 1 4 --json "$OUT/svo_8b_c256.json" \
          > "$OUT/svo_8b_c256.log" 2>&1
        svo_summary "$OUT" ;;
    serve-c1) svo="python benchmarks/serve_vs_offline.py --device cuda ${TOKENIZER_DIR:+--tokenizer-dir $TOKENIZER_DIR}"
        timeout 150 $svo --preset qwen2.5-0.5b --num-prompts 8 --input-len 256 --output-len 256 \
          --concurrency 1 --max-num-seqs 1 --json "$OUT/svo_05b_c1.json" > "$OUT/svo_05b_c1.log" 2>&1
        svo_summary "$OUT" ;;
    moe) timeout 500 python -m pytest tests/gpu/test_fused_moe.py tests/gpu/test_gpu_model_families.py \
           -q -p no:cacheprovider 2>&1 | tee "$OUT/moe_tests.log" | tail -5 ;;
    moe-tput) for seqs in 256 1024; do  # MoE against dense at the same max_num_seqs
           for preset in qwen3-30b-a3b llama-3-8b; do
             timeout 140 python benchmarks/throughput.py --preset $preset --device cuda \
               --num-prompts 1000 --input-len 256 256 --output-len 256 256 --skip-hf \
               --max-num-seqs $seqs --phase-times --json "$OUT/${preset}_seqs$seqs.json" 2>&1 \
               | tee -a "$OUT/moe_tput.log" | tail -3
           done
         done ;;
    moe-graphs) for preset in qwen3-30b-a3b llama-3-8b; do  # 1,024 sequences, graphs up to 1,024
           timeout 170 python benchmarks/throughput.py --preset $preset --device cuda \
             --num-prompts 1000 --input-len 256 256 --output-len 256 256 --skip-hf \
             --max-num-seqs 1024 --max-cudagraph-capture-size 1024 --phase-times \
             --json "$OUT/${preset}_graphs1024.json" 2>&1 | tee -a "$OUT/moe_graphs.log" | tail -3
         done ;;
    moe-graphs-30b) timeout 200 python benchmarks/throughput.py --preset qwen3-30b-a3b --device cuda \
             --num-prompts 1000 --input-len 256 256 --output-len 256 256 --skip-hf \
             --max-num-seqs 1024 --max-cudagraph-capture-size 1024 --phase-times \
             --json "$OUT/qwen3-30b-a3b_graphs1024.json" 2>&1 | tee -a "$OUT/moe_graphs.log" | tail -3 ;;
    fp8-tput) for q in "" "--quantization fp8 --kv-cache-dtype fp8"; do  # issue 20, same call
           timeout 120 python benchmarks/throughput.py --preset llama-3-8b --device cuda \
             --num-prompts 1000 --input-len 256 256 --output-len 256 256 --skip-hf --phase-times \
             $q 2>&1 | tee -a "$OUT/fp8_tput.log" | grep -E "^pagedllm|  [a-z]+: |execute by"
         done ;;
    quant-b1-awq) timeout 150 python benchmarks/quant.py --out "$OUT" --timeout 70 \
             --rows b1-bf16 b1-awq 2>&1 | tee "$OUT/quant_bench.log" ;;
    moe-tpot) timeout 400 python benchmarks/moe_decode.py --preset qwen3-30b-a3b \
           --json "$OUT/qwen3_30b_a3b_tpot.json" 2>&1 | tee "$OUT/qwen3_30b_a3b_tpot.log" | tail -3 ;;
    spec) timeout 240 python -m pytest tests/gpu/test_gpu_spec_decode.py -q -p no:cacheprovider \
            --tb=short 2>&1 | tee "$OUT/spec_tests.log" | tail -20  # issue 21 (~40 s per case)
          timeout 300 python benchmarks/spec_decode.py --preset llama-3-8b --device cuda \
            --batch-sizes 1 8 2>&1 | tee "$OUT/spec_bench.log" | tail -30 ;;
    moe-kernels) timeout 100 python -m pytest tests/gpu/test_fused_moe.py -q -p no:cacheprovider \
            -k "gemv or alignment" 2>&1 | tail -3  # the one-token GEMV and the alignment (issue 19)
          timeout 300 python benchmarks/moe_kernels.py --tokens 1 8 256 1024 --gemm-tokens 1 8 256 \
            2>&1 | tee "$OUT/moe_kernels.log" | tail -30  # issue 19
          timeout 150 python benchmarks/moe_decode.py --preset qwen3-30b-a3b --profile 32 \
            --json "$OUT/qwen3_30b_a3b_tpot.json" 2>&1 | tee "$OUT/moe_tpot.log" | tail -30 ;;
    so) for f in 0 0.5; do
          timeout 280 python benchmarks/throughput.py --preset llama-3-8b --device cuda \
            --num-prompts 512 --input-len 256 256 --output-len 256 256 --skip-hf \
            --structured-fraction $f --tokenizer "${TOKENIZER_DIR:?set TOKENIZER_DIR}" --phase-times \
            --json "$OUT/so_8b_$f.json" 2>&1 | tee "$OUT/so_8b_$f.log" | tail -3
        done
        timeout 60 python benchmarks/structured_output.py --batch 256 --steps 50 \
          --tokenizer "$TOKENIZER_DIR" 2>&1 | tee "$OUT/so_backends.log" | tail -12 ;;
    quant) timeout 170 python -m pytest tests/gpu/test_quant_kernels.py \
             tests/gpu/test_gpu_quantization.py -q -p no:cacheprovider 2>&1 \
             | tee "$OUT/quant_tests.log" | tail -15
           timeout 330 python benchmarks/quant.py --out "$OUT" --timeout 110 2>&1 \
             | tee "$OUT/quant_bench.log" ;;
    quant-kernels) timeout 140 python benchmarks/quant_kernels.py --json "$OUT/quant_kernels.json" \
             2>&1 | tee "$OUT/quant_kernels.log" | grep -E "SMs|ms/token|^best|failed|Error" | tail -60
           timeout 330 python benchmarks/quant.py --out "$OUT" --timeout 110 2>&1 \
             | tee "$OUT/quant_bench.log" ;;
    quant-gemv) timeout 150 python -m pytest tests/gpu/test_quant_kernels.py -q \
             -p no:cacheprovider 2>&1 | tee "$OUT/quant_tests.log" | tail -5  # the GEMVs
           timeout 150 python benchmarks/quant_kernels.py --m 1 --json "$OUT/quant_kernels.json" \
             2>&1 | tee "$OUT/quant_kernels.log" | grep -E "SMs|ms/token|^best|failed|Error" | tail -60
           timeout 250 python benchmarks/quant.py --out "$OUT" --timeout 80 --rows b1-bf16 b1-fp8 \
             b1-awq 2>&1 | tee "$OUT/quant_bench.log" ;;
    kernel) timeout 120 python benchmarks/kernel_decode.py 2>&1 | tee "$OUT/kernel.log" | tail -12 ;;
    flash) timeout 180 python -m pytest tests/gpu/test_flash_attn.py -q -p no:cacheprovider \
             2>&1 | tee "$OUT/flash_tests.log" | tail -8
           timeout 90 python benchmarks/kernel_attention.py 2>&1 | tee "$OUT/kernel_attention.log"
           for w in "w1 120 150" "llama8b 150 240"; do
             set -- $w
             for backend in TRITON_ATTN FLASH_ATTN; do
               [ $1 = w1 ] && preset="qwen2.5-0.5b --num-prompts 256 --input-len 100 1024 --output-len 100 1024" \
                 || preset="llama-3-8b --num-prompts 1000 --input-len 256 256 --output-len 256 256"
               [ $backend = TRITON_ATTN ] && limit=$2 || limit=$3
               timeout $limit python benchmarks/throughput.py --preset $preset --device cuda \
                 --skip-hf --attention-backend $backend --json "$OUT/$1_$backend.json" 2>&1 \
                 | tee "$OUT/$1_$backend.log" | tail -2
             done
           done
           timeout 120 python -m pytest tests/gpu/test_triton_attention.py -q -p no:cacheprovider \
             2>&1 | tee "$OUT/triton_tests.log" | tail -3 ;;
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
