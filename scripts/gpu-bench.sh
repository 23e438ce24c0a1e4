#!/usr/bin/env bash
# One prepared GPU benchmark run (issue 6), sized for 8 minutes of a lent H100/H200 including
# start-up and autotuning. Prepare the carried binary here with `make gpu-bench` (a CUDA release
# build, stripped, xz-compressed to target/gpu-bench/qpert.xz), then on the device machine, from the
# repository root:
#
#   bash scripts/gpu-bench.sh    (run tool: carry ["target/gpu-bench", "cache/cubecl"], timeout_s 540)
#
# It runs, in this order, each under its own time limit so one overrun cannot eat the others:
#   0. the CUDA parity tests (target/gpu-bench/parity.xz, tests/parity.rs -- --ignored): f32 against
#      the fixtures at 1e-5, bf16/f16 within their bounds; max errors in parity.txt;
#   1. the PyTorch reference (scripts/torch_baseline.py, blip2-itm-vit-g-coco with random weights):
#      the released loop's per-image unit and a batched pipeline, f32 and bf16;
#   2. `qpert bench` on the same config in $PRECISION (default bf16, the issue's target setting), 64
#      synthetic images, k = 64 (as Flickr30K: with 64 images every text pairs with every image, so
#      an image's ITM pairs come in long runs, as in Flickr30K), with a warm-up run so JIT
#      compilation + autotuning is measured;
#   3. the ratio table (qpert against the reference, same GPU, same run);
#   4. with the time left (up to 530 s in all), the whole mini pipeline on the GPU (configs/mini.toml,
#      principal projector) and its metrics against the Python reference's (mini.txt).
# Everything lands in $OUT (default /tmp/gpu-bench): *.txt logs, *.json reports, gpu.txt, and
# cubecl/<gpu>.db.xz: what this run added to CubeCL's database for this GPU model beyond the seed
# below (autotune results, kernels compiled here). Copy it as it is into cache/cubecl/ here, which
# is carried (run tool: carry ["target/gpu-bench", "cache/cubecl"]), so that the next device run
# starts warm; the script points CubeCL at cache/cubecl through a cubecl.toml in its run folder. A
# cold run starts from the kernels that scripts/cuda-preflight.sh compiled here
# (cache/cubecl/cubin-sm90a.db.xz, ptx-sm90.db.xz), so it skips NVRTC and the driver's PTX JIT, and
# adds cache/cubecl/<gpu>.db.xz on top.
# Knobs (environment): IMAGES (64), K (64), PRECISION (bf16 | f16 | f32), ATTENTION (aligned | fused |
# explicit: `model.attention`; a run that fails fast is retried with the explicit attention, then in
# f16 and f32; the bench times the vision tower with all three kernels and ITM with both
# cross-attention layouts in any case), CUBECL_AUTOTUNE_LEVEL (minimal: bounds the autotuning time;
# set balanced for the default search), PARITY_TIMEOUT (90 s), TORCH_TIMEOUT (150 s), QPERT_TIMEOUT
# (330 s, and the bench runs end by 480 s; all fits the run tool's 540 s), PYTHON (python3: the one
# with PyTorch + transformers).
# A CPU dry run of the script's logic (any qpert binary in target/gpu-bench/qpert.xz):
#   DEVICE=cpu MODEL_CONFIG=tiny IMAGES=4 TORCH_ARGS="--tiny --device cpu" bash scripts/gpu-bench.sh
set -uo pipefail

OUT="${OUT:-/tmp/gpu-bench}"
IMAGES="${IMAGES:-64}"
K="${K:-64}"
PRECISION="${PRECISION:-bf16}"
ATTENTION="${ATTENTION:-aligned}"
DEVICE="${DEVICE:-cuda}"
MODEL_CONFIG="${MODEL_CONFIG:-coco}"
TORCH_ARGS="${TORCH_ARGS:-}"
PARITY_TIMEOUT="${PARITY_TIMEOUT:-90}"
TORCH_TIMEOUT="${TORCH_TIMEOUT:-150}"
QPERT_TIMEOUT="${QPERT_TIMEOUT:-330}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
mkdir -p "$OUT"
start=$(date +%s)
say() { echo "[gpu-bench +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/log.txt"; }

BIN_XZ="target/gpu-bench/qpert.xz"
if [ ! -f "$BIN_XZ" ]; then
    echo "gpu-bench: $BIN_XZ is missing: run \`make gpu-bench\` first and carry target/gpu-bench" >&2
    exit 2
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
# The device image may have no xz command: Python's lzma reads and writes the same format.
unxz_to() { # archive output
    if command -v xz > /dev/null; then xz -dc "$1" > "$2"
    else "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; fi
}
# A SQLite statement on CubeCL's database (Python's sqlite3: the image may have no sqlite3 command).
sql() { # database statement [attached database]
    "$PY" -c 'import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
if len(sys.argv) > 3:
    db.execute("attach database ? as other", (sys.argv[3],))
print(db.execute(sys.argv[2]).rowcount)
db.commit()' "$@"
}
xz_to() { # file archive
    if command -v xz > /dev/null; then xz -6 -T0 -c "$1" > "$2"
    else "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(open(sys.argv[1], "rb"), lzma.open(sys.argv[2], "wb", preset=6))' "$1" "$2"; fi
}
BIN="${TMPDIR:-/tmp}/qpert-gpu"
unxz_to "$BIN_XZ" "$BIN" && chmod +x "$BIN" || { echo "gpu-bench: cannot decompress $BIN_XZ" >&2; exit 1; }

# NVRTC ships inside the PyTorch installation (site-packages/nvidia/cu13/lib); burn-cuda needs it.
NVLIB="$("$PY" - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = [p for p in nvidia.__path__]
except ImportError:
    import site
    roots = [os.path.join(s, "nvidia") for s in site.getsitepackages()]
dirs = []
for root in roots:
    dirs += sorted(glob.glob(os.path.join(root, "cu13", "lib"))) + sorted(glob.glob(os.path.join(root, "*", "lib")))
print(":".join(d for d in dict.fromkeys(dirs) if os.path.isdir(d)))
PY
)"
export LD_LIBRARY_PATH="${NVLIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for cuda in /usr/local/cuda /usr/local/cuda-13*; do
    [ -d "$cuda/include" ] && { export CUDA_PATH="${CUDA_PATH:-$cuda}"; break; }
done
say "binary $(du -h "$BIN" | cut -f1) built from $(cat target/gpu-bench/commit 2>/dev/null || echo '?'); NVRTC dirs: ${NVLIB:-none found}; CUDA_PATH=${CUDA_PATH:-unset}; autotune level $CUBECL_AUTOTUNE_LEVEL"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 \
    || echo "no nvidia-smi" > "$OUT/gpu.txt"
say "GPU: $(cat "$OUT/gpu.txt")"

# CubeCL reads cubecl.toml from the working directory up: run the binaries from a folder whose
# cubecl.toml keeps autotune results and compiled kernels in cache/cubecl/<gpu model>.db.
REPO="$PWD"
GPU_MODEL="$(head -1 "$OUT/gpu.txt" | cut -d, -f1 | tr 'A-Z' 'a-z' | tr -c 'a-z0-9.\n' '-')"
RUN_DIR="$(mktemp -d)"
mkdir -p "$REPO/cache/cubecl"
cat > "$RUN_DIR/cubecl.toml" <<TOML
[environment]
name = "${GPU_MODEL:-gpu}"
path = { directory = "$REPO/cache/cubecl" }

[compilation]
cache = true
TOML
DB="$REPO/cache/cubecl/${GPU_MODEL:-gpu}.db"
# The seed's keys (namespace, key), written when this run seeds the database: what the run adds
# beyond them is what comes back (the whole database would pass the 16 MiB that files come back in).
SEED_KEYS="$DB.seed-keys"
cold=1
[ -f "$DB" ] && cold=0
[ "$cold" = 1 ] && rm -f "$SEED_KEYS" # a database removed by hand leaves its seed's keys behind
say "CubeCL environment: $DB ($( [ "$cold" = 0 ] && echo "there, warm" || echo "new, cold" ))"
# A cold environment starts from the kernels that scripts/cuda-preflight.sh compiled on the build
# machine (CubeCL's compilation cache only), so NVRTC need not run here for them: as sm_90a cubins
# (cache/cubecl/cubin-sm90a.db.xz), which the driver loads as they are, else as PTX
# (ptx-sm90.db.xz), which it JIT-compiles on each load. Only on compute capability 9.0 and a driver
# at least as new as the CUDA compilers that made them (else it could not load them); the cubins
# only if the driver loads their probe (one of them) in a throwaway context first.
SEED="$REPO/cache/cubecl/ptx-sm90.db.xz"
CUBIN_SEED="$REPO/cache/cubecl/cubin-sm90a.db.xz"
if [ "$cold" = 1 ] && [ -f "$SEED" ]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)"
    driver_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
    nvrtc="$(cat "$REPO/cache/cubecl/ptx-sm90.nvrtc" 2>/dev/null || echo 99)"
    seeded_from="$(cat "$REPO/cache/cubecl/ptx-sm90.commit" 2>/dev/null || echo '?')"
    binaries_from="$(cat "$REPO/target/gpu-bench/commit" 2>/dev/null || echo '?')"
    # Fused kernels change with the code around them: a seed of other binaries misses some.
    [ "$seeded_from" = "$binaries_from" ] \
        || say "warning: the seed holds the kernels of $seeded_from's binaries, these are $binaries_from's (run make cuda-preflight): the kernels that differ compile here"
    if [ "$cap" = 9.0 ] && [ -n "$driver_cuda" ] \
        && [ "$(printf '%s\n%s\n' "$nvrtc" "$driver_cuda" | sort -V | head -1)" = "$nvrtc" ]; then
        probe="$( [ -f "$CUBIN_SEED" ] && "$PY" - "$REPO/cache/cubecl/cubin-sm90a.probe" <<'PY' 2>&1
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
device, context, module = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
image = open(sys.argv[1], "rb").read()
for name, call in [("cuInit", lambda: cuda.cuInit(0)),
                   ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(device), 0)),
                   ("cuDevicePrimaryCtxRetain", lambda: cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)),
                   ("cuCtxSetCurrent", lambda: cuda.cuCtxSetCurrent(context)),
                   ("cuModuleLoadData", lambda: cuda.cuModuleLoadData(ctypes.byref(module), image))]:
    status = call()
    if status != 0:
        sys.exit(f"{name} returned CUDA error {status}")
print("loaded")
PY
)"
        if echo "$probe" | grep -qx loaded; then
            unxz_to "$CUBIN_SEED" "$DB" && say "seeded it with the precompiled sm_90a cubins of $seeded_from ($(du -h "$CUBIN_SEED" | cut -f1), nvJitLink $nvrtc; driver CUDA $driver_cuda)"
        else
            unxz_to "$SEED" "$DB" && say "seeded it with the precompiled PTX of $seeded_from ($(du -h "$SEED" | cut -f1), NVRTC $nvrtc; driver CUDA $driver_cuda; cubin probe: $(echo "${probe:-no cubin seed}" | tail -1))"
        fi
        [ -f "$DB" ] && rm -f "$SEED_KEYS" && sql "$SEED_KEYS" "create table keys as select namespace, key from other.entries" "$DB" > /dev/null
    else
        say "not seeded with ptx-sm90.db.xz: compute capability '${cap:-?}', driver CUDA '${driver_cuda:-?}', PTX from NVRTC $nvrtc"
    fi
fi
# A cold environment also takes what an earlier device run on this GPU model added (its
# $OUT/cubecl/<gpu>.db.xz, copied into cache/cubecl): on top of the seed, or alone without one.
# The seed wins where both hold a kernel (a cubin there, where the earlier run compiled PTX).
if [ "$cold" = 1 ] && [ -f "$DB.xz" ]; then
    unxz_to "$DB.xz" "$RUN_DIR/earlier.db" && if [ -f "$DB" ]; then
        say "added $(sql "$DB" "insert or ignore into entries select * from other.entries" "$RUN_DIR/earlier.db") entries of an earlier run on this GPU model ($DB.xz)"
        rm -f "$RUN_DIR/earlier.db"
    else
        mv "$RUN_DIR/earlier.db" "$DB" && say "started from an earlier run on this GPU model ($DB.xz)"
    fi
fi
cd "$RUN_DIR" || exit 1

say "0 CUDA parity (tests/parity.rs --ignored)"
if [ -f "$REPO/target/gpu-bench/parity.xz" ]; then
    unxz_to "$REPO/target/gpu-bench/parity.xz" "$RUN_DIR/parity" && chmod +x "$RUN_DIR/parity"
    # The test binary finds tests/fixtures under the repository path it was built in (recorded by
    # make gpu-bench): link that path to this copy of the repository.
    built_in="$(cat "$REPO/target/gpu-bench/manifest-dir" 2>/dev/null || true)"
    if [ -n "$built_in" ] && [ ! -d "$built_in/tests/fixtures" ]; then
        mkdir -p "$(dirname "$built_in")" && ln -sfn "$REPO" "$built_in"
    fi
    timeout "$PARITY_TIMEOUT" "$RUN_DIR/parity" --ignored --nocapture --test-threads 1 2>&1 | tee "$OUT/parity.txt"
    say "parity exit ${PIPESTATUS[0]}"
else
    say "no target/gpu-bench/parity.xz: parity skipped (make gpu-bench builds it)"
fi

say "1/3 PyTorch reference"
# shellcheck disable=SC2086 # TORCH_ARGS is a list of options
timeout "$TORCH_TIMEOUT" "$PY" "$REPO/scripts/torch_baseline.py" $TORCH_ARGS --json "$OUT/torch.json" 2>&1 | tee "$OUT/torch.txt"
say "torch exit ${PIPESTATUS[0]}"

# One bench run: $1 attention, $2 precision, under QPERT_TIMEOUT or what is left of the run's first
# 480 s (so that the ratios, the CubeCL cache and the mini pipeline still fit), whichever is less.
bench() {
    local limit=$(( 480 - ($(date +%s) - start) ))
    [ "$limit" -gt "$QPERT_TIMEOUT" ] && limit=$QPERT_TIMEOUT
    if [ "$limit" -lt 60 ]; then
        say "2/3 no time left for qpert bench with $1 attention in $2 (${limit} s)"
        return 124
    fi
    say "2/3 qpert bench ($MODEL_CONFIG config, $2, $1 attention, $IMAGES images, k = $K, $DEVICE, warm-up run first, ${limit} s)"
    timeout "$limit" "$BIN" bench --model-config "$MODEL_CONFIG" --device "$DEVICE" --precision "$2" \
        --attention "$1" --images "$IMAGES" --k "$K" --warmup --json "$OUT/qpert-bench.json" 2>&1 | tee "$OUT/qpert-bench-$1-$2.txt"
    local status=${PIPESTATUS[0]}
    say "qpert exit $status"
    return "$status"
}
# A run that fails fast (not a timeout) is retried with the plainest kernels: the explicit
# attention, then f16 (the half-precision path that `make test-cubecl` checks on lavapipe) and f32,
# so that one device run yields numbers even if a bf16 kernel does not compile on this GPU.
fallbacks=("$ATTENTION $PRECISION" "explicit $PRECISION")
[ "$PRECISION" = bf16 ] && fallbacks+=("explicit f16")
[ "$PRECISION" != f32 ] && fallbacks+=("explicit f32")
tried=""
for run in "${fallbacks[@]}"; do
    case " $tried " in *" ${run/ /:} "*) continue ;; esac # the same pair twice (ATTENTION=explicit)
    tried="$tried ${run/ /:}"
    # shellcheck disable=SC2086 # "attention precision"
    bench $run && break
    [ $? -eq 124 ] && break # a timeout is not retried: the next run would not fit either
done

say "3/3 ratios"
if [ -f "$OUT/torch.json" ] && [ -f "$OUT/qpert-bench.json" ]; then
    "$PY" "$REPO/scripts/torch_baseline.py" --ratios-only "$OUT/torch.json" --qpert-json "$OUT/qpert-bench.json" \
        2>&1 | tee "$OUT/ratios.txt"
else
    say "no ratio table: a report is missing (see torch.txt / qpert-bench-*.txt)"
fi
# What this run added beyond the seed (all of it where nothing was seeded), xz-compressed: files
# come back from the device at 16 MiB at most. SQLite keeps recent writes in a -wal file beside the
# database until a checkpoint folds them in.
if [ -f "$DB" ]; then
    sql "$DB" "pragma wal_checkpoint(truncate)" > /dev/null
    added="$RUN_DIR/added.db"
    rm -f "$added"
    "$PY" - "$DB" "$added" "$SEED_KEYS" <<'PY'
import os, sqlite3, sys
source, target, seed_keys = sys.argv[1:4]
db = sqlite3.connect(target)
db.execute("attach database ? as run", (source,))
db.execute("create table meta as select * from run.meta")
db.execute(db.execute("select sql from run.sqlite_master where name = 'entries'").fetchone()[0])
if os.path.exists(seed_keys):
    db.execute("attach database ? as seed", (seed_keys,))
    db.execute("insert into entries select * from run.entries e where not exists"
               " (select 1 from seed.keys s where s.namespace = e.namespace and s.key = e.key)")
else:
    db.execute("insert into entries select * from run.entries")
db.commit()
PY
    mkdir -p "$OUT/cubecl" && xz_to "$added" "$OUT/cubecl/$(basename "$DB").xz" \
        && say "CubeCL cache for the next run: $OUT/cubecl/$(basename "$DB").xz ($(du -h "$OUT/cubecl/$(basename "$DB").xz" | cut -f1)): copy it into cache/cubecl/ as it is, which is carried"
fi
say "4 the mini pipeline on $DEVICE against the Python reference"
left=$(( 530 - ($(date +%s) - start) ))
if [ "$left" -gt 20 ]; then
    ln -sfn "$REPO/tests" "$RUN_DIR/tests" # configs/mini.toml names its inputs relative to the repository
    timeout "$left" "$BIN" run --config "$REPO/configs/mini.toml" --set model.device="$DEVICE" \
        --set qpert.projector=principal --set output.dir="$OUT/mini" > "$OUT/mini.txt" 2>&1
    say "mini exit $?"
    "$PY" - "$OUT/mini/report/metrics.json" "$REPO/tests/fixtures/e2e/expected_principal.json" <<'PY' 2>&1 | tee -a "$OUT/mini.txt"
import json, sys
got, want = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))["metrics"]
pairs = [(f"{b} {k}", got[b][k], v) for b in ("itc", "rerank") for k, v in want[b].items() if k != "bins"]
differ = [(name, g, w) for name, g, w in pairs if g is None or w is None or abs(g - w) > 1e-9]
print(f"mini pipeline: {len(pairs) - len(differ)} of {len(pairs)} metrics equal the Python reference")
for name, g, w in differ:
    print(f"  {name}: got {g}, reference {w}")
PY
else
    say "no time left for the mini pipeline"
fi
say "done"
