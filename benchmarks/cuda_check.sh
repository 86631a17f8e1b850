#!/usr/bin/env bash
# The CUDA checks, step by step, on a GPU machine (CI has none):
#   OUT=results/ bash benchmarks/cuda_check.sh env tests kernels bench:float16:eager bench:float16:graphs ...
# Steps: env | tests | tests-compile | kernels | profile | bench:DTYPE:MODE[:QUANT[:EXTRAS]]
#   (MODE: eager, graphs = --compile graphs, compile = --compile; QUANT: 8 or 4; EXTRAS: lm_head,embeddings,vision)
# Each step has its own time limit, so one that hangs does not take the rest with it. Logs and the bench
# JSON land in $OUT. Needs the reference fixtures at ../shared/reference (the tests) and torch with Triton.
set -u
OUT=${OUT:-cuda-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

for step in "$@"; do
  echo "=== $step"
  case "$step" in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
      $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
      ;;
    tests)
      timeout 300 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "kernel or graphs" 2>&1 | tee "$OUT/tests.log" | tail -15
      ;;
    tests-compile)
      timeout 400 $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "True" 2>&1 | tee "$OUT/tests-compile.log" | tail -15
      ;;
    profile)
      timeout 200 $PY benchmarks/cuda_profile.py --layers 4 2>&1 | tee "$OUT/profile.log" | head -60
      ;;
    kernels)
      timeout 300 $PY benchmarks/cuda_kernels.py --rows 1,32 --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
      ;;
    bench:*)
      IFS=: read -r _ dtype mode quant extras <<< "$step"
      args=(--model "${MODEL:-visualglm-6b}" --device "${DEVICE:-cuda}" --dtype "$dtype" --json ${BENCH_ARGS:-})
      [ "$mode" = graphs ] && args+=(--compile graphs)
      [ "$mode" = compile ] && args+=(--compile)
      [ -n "${quant:-}" ] && args+=(--quant "$quant")
      [ -n "${extras:-}" ] && args+=(--quant-extras "$extras")
      name="bench-${dtype}-${mode}${quant:+-int$quant}${extras:+-extras}"
      timeout 400 $PY -m visualglm bench "${args[@]}" > "$OUT/$name.json" 2> "$OUT/$name.log"
      echo "rc=$?"; tail -3 "$OUT/$name.log"
      $PY - "$OUT/$name.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no result: {e}")
d = r["decode"]
print(f"{sys.argv[1]}: bw {r['bandwidth_gbs']:.0f} GB/s, bytes/token {r['weight_bytes_per_token']/1e9:.2f} GB, "
      f"b1 {d['1']['tokens_per_s']:.1f} tok/s (roofline {r['roofline_ratio']:.3f}), "
      + ", ".join(f"b{b} {v['tokens_per_s']:.0f} tok/s" for b, v in d.items() if b != "1")
      + f", b32/b1 {d.get('32', d['1'])['tokens_per_s'] / d['1']['tokens_per_s']:.1f}x, "
      f"image {r.get('image_encode_s', float('nan'))*1e3:.1f} ms, prefill {r['prefill_s']*1e3:.1f} ms, "
      f"peak cuda {r.get('peak_cuda_gb', float('nan')):.2f} GB")
EOF
      ;;
    *) echo "unknown step $step" ;;
  esac
done
