#!/usr/bin/env bash
# What one call of the lent GPU machine runs: build with CUDA, then the named parts.
#   bash benchmarks/gpu_session.sh bench|test|quality ...
# Results land in $OUT (the device tool brings them back); data comes from .devdata/ (a copy of shared/data
# that travels with the tree) unless NFGEN_DATA is set; NFGEN_COMMIT names the commit being measured.
set -uo pipefail
export PYTHONUNBUFFERED=1
export NFGEN_DATA=${NFGEN_DATA:-$PWD/.devdata}
OUT=${OUT:-/tmp/nfgen-out}
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*"; }

stamp build
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import nfkernels; assert nfkernels.HAS_EXT, 'extension missing'"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")

for part in "$@"; do
  case "$part" in
    bench)
      for b in fit vq ssim generate; do
        stamp "bench_$b"
        timeout 300 python3 -m benchmarks.bench_$b --device cuda --out "$OUT/$b-$dev.json" 2>&1 | tee "$OUT/bench_$b.log" | tail -30
      done ;;
    bench-*)
      b=${part#bench-}
      stamp "bench_$b"
      timeout "${BENCH_TIMEOUT:-240}" python3 -m benchmarks.bench_$b --device cuda --out "$OUT/$b-$dev.json" 2>&1 | tee "$OUT/bench_$b.log" | tail -40 ;;
    test)
      stamp tests
      timeout 500 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log" | tail -40 ;;
    quality)
      stamp quality
      timeout 560 python3 -m benchmarks.quality --config full --device cuda --results "$OUT/quality-$dev.json" \
        2>&1 | tee "$OUT/quality.log" | tail -60 ;;
  esac
done
stamp done
