#!/usr/bin/env bash
# What one call of the lent GPU machine runs: build with CUDA, then the named parts.
#   bash benchmarks/gpu_session.sh bench|bench-<name>|test|fit-precision|scaleout|quality|quality-sampling|quality-ablations ...
# Results land in $OUT (the device tool brings them back); data comes from .devdata/ (a copy of shared/data
# that travels with the tree) unless NFGEN_DATA is set; NFGEN_COMMIT names the commit being measured.
# The device tool returns at most 8 files a call, named in letters, digits, '.', '_' and '-': every part's log
# goes to one $OUT/session.log, and result names are built from those characters only. Count a call's files before
# it (bench writes 5 JSONs, test tests.log, quality a JSON and a PNG, each other part one JSON, plus session.log).
# The machine is given back after 30 s idle (status: idle_release_s), so plan every call as if on a bare machine:
# its build plus its parts within one call's 600 s. quality writes its JSON after every row, so a part that its
# timeout kills still brings back the rows it finished.
# The device tool's command (the tree travels as `git archive --format=tar HEAD -o .devhead.tar`, the data as a
# .devdata/ copy of shared/data, both carried): unpack to /tmp/n and copy only files whose content changed into
# /tmp/w, so a later call on a warm machine keeps its build and rebuilds only changed sources:
#   mkdir -p /tmp/w && rm -rf /tmp/n && mkdir /tmp/n && tar -xf .devhead.tar -C /tmp/n && python3 -c "
#   import filecmp,os,shutil
#   for r,_,fs in os.walk('/tmp/n'):
#     for f in fs:
#       s=os.path.join(r,f); d=os.path.join('/tmp/w',os.path.relpath(s,'/tmp/n'))
#       if not os.path.exists(d) or not filecmp.cmp(s,d,shallow=False):
#         os.makedirs(os.path.dirname(d),exist_ok=True); shutil.copyfile(s,d)
#   "; [ -d /tmp/w/.devdata ] || cp -r .devdata /tmp/w/; cd /tmp/w; NFGEN_COMMIT=<sha> bash benchmarks/gpu_session.sh ...
# Tests beside a long part (their log goes to tests.log); they share the GPU, so the long part's timings and
# its free-memory batch sizes (generate's default_batch_size) are not clean there:
#   SKIP_BUILD=1 bash benchmarks/gpu_session.sh test >/dev/null 2>&1 & SKIP_BUILD=1 bash benchmarks/gpu_session.sh quality; wait
set -uo pipefail
export PYTHONUNBUFFERED=1
export NFGEN_DATA=${NFGEN_DATA:-$PWD/.devdata}
OUT=${OUT:-/tmp/nfgen-out}
# quality's artifact cache lives outside the tree, which each call unpacks afresh: a later call that still finds the
# machine warm (within the 30 s) reuses the template, fields, tokens and models keyed by their recipe
RUNS=${RUNS:-/tmp/nfgen-runs}
PARTS="bench, bench-<name>, test, fit-precision, scaleout, quality, quality-sampling or quality-ablations"
for part in "$@"; do  # a misspelt part must not cost a machine start and a build
  case "$part" in
    bench|bench-*|test|fit-precision|scaleout|quality|quality-sampling|quality-ablations) ;;
    *) echo "gpu_session.sh: unknown part '$part'; use $PARTS" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "gpu_session.sh: name the parts to run: $PARTS" >&2; exit 2; }
mkdir -p "$OUT"
LOG="$OUT/session.log"
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 )) s] $*" | tee -a "$LOG"; }

stamp build
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"
# SKIP_BUILD=1: a second invocation beside a running one (tests next to quality) must not rebuild under it
[ -n "${SKIP_BUILD:-}" ] || MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . \
  >/tmp/nfgen-build.log 2>&1 || { tail -40 /tmp/nfgen-build.log | tee -a "$LOG"; exit 1; }
python3 -c "import nfkernels; assert nfkernels.HAS_EXT, 'extension missing'"
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")

for part in "$@"; do
  case "$part" in
    bench)
      for b in fit vq ssim generate decode_attention; do  # bench-<name> takes --sweep via BENCH_ARGS
        # generate: one repeat and a 20 s recompute budget, as the last H100 run needed to fit its 300 s; batch 1 last
        # (its peers took 150 s there), so a run its timeout stops keeps batches 64 and 1024 (JSON after every row)
        args=""; [ "$b" = generate ] && args="--repeats 1 --recompute-budget 20 --batches 64,1024,1"
        stamp "bench_$b $args"
        timeout 300 python3 -m benchmarks.bench_$b --device cuda $args --out "$OUT/$b-$dev.json" 2>&1 | tee -a "$LOG" \
          | tail -30
      done ;;
    bench-*)  # BENCH_ARGS: extra options (e.g. --sweep, --n-kv-head 2); BENCH_SUFFIX: added to the result's name
      # (bench_fit --sweep ran past 230 s on the H100: BENCH_TIMEOUT defaults to 360)
      b=${part#bench-}
      stamp "bench_$b ${BENCH_ARGS:-}"
      timeout "${BENCH_TIMEOUT:-360}" python3 -m benchmarks.bench_$b --device cuda ${BENCH_ARGS:-} \
        --out "$OUT/$b-$dev${BENCH_SUFFIX:-}.json" 2>&1 | tee -a "$LOG" | tail -40 ;;
    test)  # every failure, not just the first; the whole log in tests.log
      stamp tests
      # (a406862: 262 of 398 tests in 320 s on the H100, so give it the 500 s; --durations says where it goes)
      timeout "${TEST_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider --durations=25 tests 2>&1 | tee "$OUT/tests.log" \
        | tail -40 | tee -a "$LOG" ;;
    fit-precision)  # issue 3's mixed-precision check: the quality recipe's fit PSNR per Triton dot precision (~30 s)
      stamp fit-precision
      timeout 120 python3 -m benchmarks.fit_precision --device cuda --out "$OUT/fit-precision-$dev.json" 2>&1 \
        | tee -a "$LOG" | tail -10 ;;
    scaleout)  # issue 7 at world size 1: NCCL init, torchrun fit = plain fit, train SIGKILLed and resumed
      stamp scaleout
      timeout 300 python3 -m benchmarks.scaleout_check --device cuda --out "$OUT/scaleout-$dev.json" 2>&1 \
        | tee -a "$LOG" | tail -40 ;;
    quality)  # the main and NeF-GPT rows; TRAIN_SEEDS=K pools K GPT trainings (each about 4 min more on the H100:
      # 168 s of training at a406862 plus its draws; raise QUALITY_TIMEOUT with it)
      stamp quality
      timeout "${QUALITY_TIMEOUT:-420}" python3 -m benchmarks.quality --config full --device cuda --run-dir "$RUNS/q" \
        --train-seeds "${TRAIN_SEEDS:-1}" --results "$OUT/quality-$dev.json" 2>&1 | tee -a "$LOG" | tail -60 ;;
    quality-sampling)  # the sampling sweep on the main model (cached in the run dir by the quality part); its 8 rows
      # took more than 150 s on the H100 (15 s a row, 30 s with CFG), it has 12 now, and a killed sweep writes nothing
      stamp quality-sampling
      timeout "${SAMPLING_TIMEOUT:-360}" python3 -m benchmarks.quality --config full --device cuda --run-dir "$RUNS/q" \
        --only ablations --ablations sampling --seeds 1 --results "$OUT/quality-$dev-sampling.json" 2>&1 \
        | tee -a "$LOG" | tail -30 ;;
    quality-ablations)  # ABLATIONS: the rows that train their own GPT (a comma list; see benchmarks/quality.py).
      # About a minute a row on an H100 (a row that fits a new template or new fields, more) and all of them take
      # ~16: pass chunks of about 4 GPTs, which fit one call's 600 s beside the build, e.g.
      # ABLATIONS=baseline,vq:weights,vq:modes1,model:kv2 (the main's 8-mode class-pca tokens against the raw codes of
      # the a406862 era and one mean field per class, at the same 1000 steps), then vq:pca-class with
      # model:no-class-embed,model:ids-only,fit:clamp-margin0, then codebook and
      # fit,init,order,vq,model in chunks (cached rows are free). Rows run in the harness's order, not the list's.
      stamp "quality-ablations ${ABLATIONS:=baseline,fit,init,order,vq,codebook,model}"
      timeout "${QUALITY_TIMEOUT:-500}" python3 -m benchmarks.quality --config full --device cuda --run-dir "$RUNS/q" \
        --only ablations --ablations "$ABLATIONS" --seeds 1 \
        --results "$OUT/quality-$dev-ablations-${ABLATIONS//[,:+]/_}.json" 2>&1 | tee -a "$LOG" | tail -40 ;;
  esac
done
stamp done
