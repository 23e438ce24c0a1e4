#!/usr/bin/env bash
# The CUDA path of the carried gpu-bench binaries, run here without a GPU (issue 6): a stand-in
# CUDA driver (scripts/fake_cuda/libcuda.c) answers as an H100, JIT-compiles every kernel's PTX
# for sm_90a with nvJitLink and checks every launch against the card's limits; kernels do not
# execute, so every number printed is meaningless. What it shows, before a scarce GPU session:
#   - that every kernel the device run generates compiles (NVRTC) and loads (PTX -> sm_90a), and
#     that every launch fits an H100 (threads, registers, shared memory, TMA descriptors);
#   - how many kernels there are, and how long compiling them takes.
# It also leaves what it compiled for the device run: cache/cubecl/ptx-sm90.db.xz holds the PTX of
# every kernel (CubeCL's compilation cache, nothing else: no autotune results, which would be
# garbage here), and cache/cubecl/cubin-sm90a.db.xz the same entries compiled on to sm_90a machine
# code (scripts/cubin_seed.py). scripts/gpu-bench.sh seeds a cold GPU's CubeCL environment with the
# cubins (or with the PTX, if the card refuses the cubin probe), so the device run skips NVRTC and
# the driver's PTX JIT. Carry them as part of cache/cubecl.
#
#   make gpu-bench && make cuda-preflight      (or bash scripts/cuda-preflight.sh)
#
# It runs the steps of scripts/gpu-bench.sh with the same settings: the parity binary (its checks
# fail here, as no kernel runs; it is run for its kernels), `qpert bench` on the coco config with a
# warm-up, and the mini pipeline; then (oom) the mini pipeline and the bench on a stand-in card with
# too little memory, which must fail with qpert's one-line device errors. NVRTC, nvJitLink and the CUDA headers are NVIDIA's PyPI wheels of
# CUDA $CUDA_VERSION, installed into target/fake-cuda/cuda-$CUDA_VERSION on first use (about 340 MB):
# the lent GPUs' driver is CUDA 13.0 (580.159; KINDS.md of the device tool), which cannot load PTX
# from a newer NVRTC. Knobs: STEPS ("parity bench mini oom"), IMAGES (64), K (64), PRECISION (bf16),
# ATTENTION (aligned), CUBECL_AUTOTUNE_SHORT_CIRCUIT (0, see below), CUDA_VERSION (13.0), PYTHON
# (python3, with pip), XZ_CARRY (the Makefile's: how the seeds are compressed), REHEARSE (0; 1 also runs
# scripts/gpu-bench.sh itself against the stand-ins, about 8 min more), TORCH_PYTHON (the Python
# with PyTorch for the rehearsal's reference step; without it that step fails and the rest runs).
# Logs in $OUT (default target/fake-cuda/out).
set -uo pipefail

REPO="$PWD"
WORK="$REPO/target/fake-cuda"
OUT="${OUT:-$WORK/out}"
STEPS="${STEPS-parity bench mini oom}"
IMAGES="${IMAGES:-64}"
K="${K:-64}"
PRECISION="${PRECISION:-bf16}"
ATTENTION="${ATTENTION:-aligned}"
XZ_CARRY="${XZ_CARRY:-xz -T1 --lzma2=preset=9e,dict=256MiB}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-minimal}"
# Autotune stops compiling a key's candidates at the first one measured near the card's peak (its
# short circuit). Kernels take no time on the stand-in, so that fired at the first candidate and
# the seed missed the rest, which a real card may well try (the bench step: 288 kernels with it,
# 443 without). Off here, so the seed holds every candidate; the rehearsal runs with CubeCL's default.
export CUBECL_AUTOTUNE_SHORT_CIRCUIT="${CUBECL_AUTOTUNE_SHORT_CIRCUIT:-0}"
start=$(date +%s)
mkdir -p "$OUT"
rm -f "$OUT"/*.txt # this run's logs only: the refusals are counted over them
say() { echo "[cuda-preflight +$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/log.txt"; }
fail() { echo "cuda-preflight: $*" >&2; exit 2; }
# The kernels (PTX entries) in a CubeCL database.
count_kernels() { "$PY" -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from entries where namespace like ?", ("cuda/%",)).fetchone()[0])' "$1"; }

for f in target/gpu-bench/qpert.xz target/gpu-bench/commit; do
    [ -f "$f" ] || fail "$f is missing: run \`make gpu-bench\` first"
done
PY="${PYTHON:-$(command -v python3)}"
CUDA_VERSION="${CUDA_VERSION:-13.0}"
WHEELS="$WORK/cuda-$CUDA_VERSION"
CUDA="$WHEELS/nvidia/cu13"
if [ ! -f "$CUDA/lib/libnvrtc.so.13" ]; then
    say "installing NVIDIA's CUDA $CUDA_VERSION wheels (NVRTC, nvJitLink, headers) into $WHEELS"
    "$PY" -m pip install -q --target "$WHEELS" "nvidia-cuda-nvrtc==$CUDA_VERSION.*" "nvidia-nvjitlink==$CUDA_VERSION.*" \
        "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" \
        || fail "pip could not install the CUDA $CUDA_VERSION wheels into $WHEELS"
fi
for f in include/cuda.h include/nvJitLink.h lib/libnvJitLink.so.13 lib/libnvrtc.so.13; do
    [ -e "$CUDA/$f" ] || fail "$CUDA/$f is missing after installing the CUDA $CUDA_VERSION wheels"
done
# scripts/cubin_seed.py reads and writes CubeCL's CBOR entries.
if [ ! -d "$WHEELS/cbor2" ]; then
    "$PY" -m pip install -q --target "$WHEELS" cbor2 || fail "pip could not install cbor2 into $WHEELS"
fi

mkdir -p "$WORK/lib"
cc -shared -fPIC -O1 -Wall -Wextra -I"$CUDA/include" -o "$WORK/lib/libcuda.so.1" scripts/fake_cuda/libcuda.c \
    -L"$CUDA/lib" -l:libnvJitLink.so.13 -Wl,-rpath,"$CUDA/lib" || fail "cannot build scripts/fake_cuda/libcuda.c"
xz -dc target/gpu-bench/qpert.xz > "$WORK/qpert" && chmod +x "$WORK/qpert" || fail "cannot decompress the qpert binary"
export LD_LIBRARY_PATH="$WORK/lib:$CUDA/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# A stand-in nvidia-smi too: scripts/gpu-bench.sh asks it about the card, and `qpert bench` samples
# its memory.used, here what the stand-in driver has allocated (so the bench's `GPU GiB` column is
# CubeCL's real device allocations, even though no kernel runs).
mkdir -p "$WORK/bin" && cp scripts/fake_cuda/nvidia-smi "$WORK/bin/"
export PATH="$WORK/bin:$PATH"
export FAKE_CUDA_USED_FILE="$WORK/device-memory-used"
export CUDA_PATH="$CUDA"
NVRTC_VERSION="$("$PY" - "$CUDA/lib/libnvrtc.so.13" <<'PY'
import ctypes, sys
major, minor = ctypes.c_int(), ctypes.c_int()
ctypes.CDLL(sys.argv[1]).nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
print(f"{major.value}.{minor.value}")
PY
)"
say "binaries of $(cat target/gpu-bench/commit); NVRTC $NVRTC_VERSION and nvJitLink from $CUDA; autotune level $CUBECL_AUTOTUNE_LEVEL"

# The compile steps (STEPS; none: rehearse with the seed already in cache/cubecl).
failed=0
if [ -n "$STEPS" ]; then
    # A fresh CubeCL environment with the compilation cache on, as scripts/gpu-bench.sh sets it up.
    ENV_DIR="$WORK/env"
    RUN_DIR="$WORK/run"
    rm -rf "$ENV_DIR" "$RUN_DIR" && mkdir -p "$ENV_DIR" "$RUN_DIR"
    cat > "$RUN_DIR/cubecl.toml" <<TOML
[environment]
name = "preflight"
path = { directory = "$ENV_DIR" }

[compilation]
cache = true
TOML
    ln -sfn "$REPO/tests" "$RUN_DIR/tests"
    cd "$RUN_DIR" || exit 1

    step() { # $1 name, then the command; its output goes to $OUT/$1.txt
        local name=$1 t0=$(date +%s)
        shift
        "$@" > "$OUT/$name.txt" 2>&1
        local status=$?
        local summary
        summary="$(grep '^fake-cuda: [0-9]* modules' "$OUT/$name.txt" | tail -1)"
        say "$name: exit $status in $(( $(date +%s) - t0 )) s; ${summary#fake-cuda: }"
        return $status
    }
    for s in $STEPS; do
        case $s in
        parity)
            xz -dc "$REPO/target/gpu-bench/parity.xz" > "$WORK/parity" && chmod +x "$WORK/parity"
            built_in="$(cat "$REPO/target/gpu-bench/manifest-dir")"
            [ -d "$built_in/tests/fixtures" ] || { mkdir -p "$(dirname "$built_in")" && ln -sfn "$REPO" "$built_in"; }
            # No kernel runs, so the parity checks fail; the kernels they launch are what counts here.
            step parity "$WORK/parity" --ignored --test-threads 1
            ;;
        bench)
            step bench "$WORK/qpert" bench --model-config coco --device cuda --precision "$PRECISION" \
                --attention "$ATTENTION" --images "$IMAGES" --k "$K" --warmup || failed=1
            ;;
        mini)
            rm -rf "$WORK/mini" # a finished run would be skipped as up to date, compiling nothing
            step mini "$WORK/qpert" run --config "$REPO/configs/mini.toml" --set model.device=cuda \
                --set qpert.projector=principal --set output.dir="$WORK/mini" || failed=1
            ;;
        oom)
            # A card with too little memory (the stand-in's FAKE_CUDA_MEMORY_GIB): the weights do not
            # fit (the mini pipeline in 30 MiB: exit 1 and a one-line device error saying so), or they
            # fit and later work does not (the coco bench in 5 GiB: where the memory runs out depends
            # on what the pools hold, so either a stage fails, exit 1 with a one-line device error,
            # or a bench probe does, reported as failed, exit 0). Always one warning line first, and
            # no panic reported as a bug.
            oom_case() { # $1 name, $2 GiB, $3 what a device error must say, $4 exit 0 allowed, then the command
                local name=$1 gib=$2 expected=$3 probes_may_fail=$4
                shift 4
                rm -rf "$WORK/mini"
                FAKE_CUDA_MEMORY_GIB=$gib step "$name" "$@"
                local status=$?
                local lines warnings
                lines="$(grep '^qpert: ' "$OUT/$name.txt" | grep -v 'reaches outside')"
                warnings="$(echo "$lines" | grep -c '^qpert: warning: the device runtime failed: ')"
                if grep -q 'internal error' "$OUT/$name.txt" || [ "$warnings" != 1 ]; then
                    status=bad
                elif [ "$status" = 1 ] && [ "$(echo "$lines" | wc -l)" = 2 ] \
                    && echo "$lines" | tail -1 | grep -q "^qpert: device: .*$expected"; then
                    status=ok
                elif [ "$status" = 0 ] && [ "$probes_may_fail" = 1 ] && grep -q '^bench: .* failed: device: ' "$OUT/$name.txt"; then
                    status=ok
                fi
                if [ "$status" = ok ]; then
                    say "$name: as expected: $(grep -h '^qpert: device: \|^bench: .* failed: device: ' "$OUT/$name.txt" | head -1 | cut -c1-160)..."
                else
                    say "$name: NOT as expected: $(echo "$lines" | tr '\n' ' ' | cut -c1-400)"
                    failed=1
                fi
            }
            oom_case oom-weights 0.03 "the model does not fit" 0 "$WORK/qpert" run --config "$REPO/configs/mini.toml" \
                --set model.device=cuda --set output.dir="$WORK/mini"
            oom_case oom-batch 5 'lower \(the batch sizes\|model\.[a-z]*_batch\)' 1 "$WORK/qpert" bench --model-config coco --device cuda \
                --precision "$PRECISION" --images 16 --k 16
            ;;
        *) fail "unknown step $s (parity, bench, mini, oom)" ;;
        esac
    done

    problems="$(grep -h '^fake-cuda: ' "$OUT"/*.txt | grep -v ' modules JIT-compiled ' | sort | uniq -c | sort -rn)"
    if [ -n "$problems" ]; then
        say "what a real H100 would refuse (count, message):"
        echo "$problems" | tee -a "$OUT/log.txt"
    else
        say "no kernel was refused"
    fi
fi

# Keep only the compilation cache (PTX by kernel, and by source hash) for the device run,
# compressed with XZ_CARRY (the device run's carry limit is 64 MiB in all). A seed already there
# from the same binaries and NVRTC is merged in: which kernels follow an autotune decision depends
# on the winner the stand-in's timings picked, so each preflight adds some (cad850e: 28 of an
# earlier run's 665 were not among the next run's 821); so does a run of only some steps
# (STEPS=parity: the parity binary's kernels). A run of some steps also writes a seed where there
# is none; a seed of other binaries is replaced only by a run of the steps that compile every
# kernel of the device run. `rm -r cache/cubecl` starts afresh.
ran() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
seed_of_these_binaries() {
    [ -f "$REPO/cache/cubecl/ptx-sm90.db.xz" ] \
        && [ "$(cat "$REPO/cache/cubecl/ptx-sm90.commit" 2>/dev/null)" = "$(cat "$REPO/target/gpu-bench/commit")" ] \
        && [ "$(cat "$REPO/cache/cubecl/ptx-sm90.nvrtc" 2>/dev/null)" = "$NVRTC_VERSION" ]
}
ptx_xz=""
if { ran parity && ran bench && ran mini; } \
    || { [ -n "$STEPS" ] && { seed_of_these_binaries || [ ! -f "$REPO/cache/cubecl/ptx-sm90.db.xz" ]; }; }; then
    mkdir -p "$REPO/cache/cubecl"
    earlier=()
    if seed_of_these_binaries; then
        xz -dc "$REPO/cache/cubecl/ptx-sm90.db.xz" > "$WORK/ptx-sm90.earlier.db" && earlier=("$WORK/ptx-sm90.earlier.db")
    fi
    "$PY" - "$ENV_DIR/preflight.db" "$WORK/ptx-sm90.db" "${earlier[@]}" <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import os, sqlite3, sys
source, target, earlier = sys.argv[1], sys.argv[2], sys.argv[3:]
if os.path.exists(target):
    os.remove(target)
db = sqlite3.connect(target)
db.execute("attach database ? as run", (source,))
db.execute("create table meta as select * from run.meta")
schema = db.execute("select sql from run.sqlite_master where name = 'entries'").fetchone()[0]
db.execute(schema)
KERNELS = "namespace like 'cuda/%/ptx_sm90' or namespace like 'cuda-second-line/%/ptx_sm90'"
count = lambda: db.execute("select count(*) from entries where namespace like 'cuda/%'").fetchone()[0]
db.execute(f"insert into entries select * from run.entries where {KERNELS}")
compiled = count()
if earlier:
    db.execute("attach database ? as earlier", (earlier[0],))
    db.execute(f"insert or ignore into entries select * from earlier.entries where {KERNELS}")
db.commit()
kernels = count()
db.execute("detach database run")
db.execute("vacuum")
db.close()
merged = f" ({compiled} compiled now, {kernels - compiled} more from the seed of the same binaries there)" if earlier else ""
print(f"ptx-sm90.db: {kernels} kernels{merged}, {os.path.getsize(target) / 2**20:.1f} MiB")
PY
    rm -f "$WORK/ptx-sm90.earlier.db"
    kernels_seeded="$(count_kernels "$WORK/ptx-sm90.db")"
    # The seed in cache/cubecl is replaced only once all of the new one is written (below).
    # One core each: this one and the cubins' below (several minutes each at XZ_CARRY's setting).
    $XZ_CARRY -c "$WORK/ptx-sm90.db" > "$WORK/ptx-sm90.db.xz" &
    ptx_xz=$!
else
    [ -f "$REPO/cache/cubecl/ptx-sm90.db.xz" ] || fail "cache/cubecl/ptx-sm90.db.xz is missing: run every step once (STEPS unset)"
    xz -dc "$REPO/cache/cubecl/ptx-sm90.db.xz" > "$WORK/ptx-sm90.db"
    kernels_seeded="$(count_kernels "$WORK/ptx-sm90.db")"
fi
# The same kernels as sm_90a cubins (scripts/cubin_seed.py), so that the device's driver loads them
# without JIT-compiling their PTX; the PTX seed stays as the fallback.
if [ -n "$ptx_xz" ] || [ ! -f "$REPO/cache/cubecl/cubin-sm90a.db.xz" ] || [ ! -f "$REPO/cache/cubecl/cubin-sm90a.probe" ]; then
    PYTHONPATH="$WHEELS" "$PY" "$REPO/scripts/cubin_seed.py" "$WORK/ptx-sm90.db" "$WORK/cubin-sm90a.db" \
        "$WORK/cubin-sm90a.probe" "$CUDA/lib/libnvJitLink.so.13" 2>&1 | tee -a "$OUT/log.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || fail "scripts/cubin_seed.py failed"
    $XZ_CARRY -c "$WORK/cubin-sm90a.db" > "$WORK/cubin-sm90a.db.xz" || fail "cannot compress $WORK/cubin-sm90a.db"
    if [ -n "$ptx_xz" ]; then
        wait "$ptx_xz" || fail "cannot compress $WORK/ptx-sm90.db"
        mv "$WORK/ptx-sm90.db.xz" "$REPO/cache/cubecl/"
        echo "$NVRTC_VERSION" > "$REPO/cache/cubecl/ptx-sm90.nvrtc"
        cp "$REPO/target/gpu-bench/commit" "$REPO/cache/cubecl/ptx-sm90.commit"
    fi
    mv "$WORK/cubin-sm90a.db.xz" "$WORK/cubin-sm90a.probe" "$REPO/cache/cubecl/"
fi
# The rehearsal (REHEARSE=1): scripts/gpu-bench.sh itself, as the device runs it, against the
# stand-in driver and a stand-in nvidia-smi, from a scratch copy of the repository's layout, so
# that the CubeCL database it writes (autotune results measured on no GPU) never lands in
# cache/cubecl. It checks the script's CUDA path and that the seed is taken and hit.
if [ "${REHEARSE:-0}" = 1 ]; then
    SCRATCH="$WORK/rehearsal"
    rm -rf "$SCRATCH" "$OUT/rehearsal" && mkdir -p "$SCRATCH/target" "$SCRATCH/cache/cubecl"
    for d in scripts configs tests; do ln -s "$REPO/$d" "$SCRATCH/$d"; done
    ln -s "$REPO/target/gpu-bench" "$SCRATCH/target/gpu-bench"
    cp "$REPO"/cache/cubecl/ptx-sm90.* "$REPO"/cache/cubecl/cubin-sm90a.* "$SCRATCH/cache/cubecl/"
    t0=$(date +%s)
    (cd "$SCRATCH" && unset CUBECL_AUTOTUNE_SHORT_CIRCUIT && OUT="$OUT/rehearsal" TORCH_ARGS="--tiny --device cpu" \
        PYTHON="${TORCH_PYTHON:-$PY}" bash scripts/gpu-bench.sh) > "$OUT/rehearsal.txt" 2>&1
    status=$?
    compiled="$(count_kernels "$(ls "$SCRATCH"/cache/cubecl/*.db | head -1)" 2>/dev/null)"
    grep -q 'seeded it with the precompiled sm_90a cubins' "$OUT/rehearsal.txt" && grep -q 'qpert exit 0' "$OUT/rehearsal.txt" || failed=1
    say "rehearsal of scripts/gpu-bench.sh: exit $status in $(( $(date +%s) - t0 )) s; $(grep -o 'seeded it[^(]*' "$OUT/rehearsal.txt" || echo 'NOT seeded'); $compiled kernels in its CubeCL db after the run ($kernels_seeded seeded); log in $OUT/rehearsal.txt"
fi
say "done: cache/cubecl/cubin-sm90a.db.xz ($(du -h "$REPO/cache/cubecl/cubin-sm90a.db.xz" | cut -f1)) and ptx-sm90.db.xz ($(du -h "$REPO/cache/cubecl/ptx-sm90.db.xz" | cut -f1)); carry cache/cubecl, and scripts/gpu-bench.sh seeds a cold GPU's environment with them"
exit $failed
