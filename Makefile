# qpert: the two commands a newcomer runs are `make test` and `make demo`.
# Cargo honours CARGO_TARGET_DIR if set. Tests use the dev profile, whose dependencies are compiled
# with opt-level 3 (Cargo.toml), so `cargo test` is fast without a second, release build.

CARGO ?= cargo
RELEASE_BIN = $(or $(CARGO_TARGET_DIR),target)/release/qpert

.PHONY: test test-cubecl test-slurm build demo reproduce-flickr reproduce-coco gpu-bench cuda-preflight

test:
	$(CARGO) test

# The CubeCL backend, i.e. the code CUDA runs (fusion, autotuned matmuls, the fused attention
# routine, the stages' fixed shapes), on this CPU: wgpu drives Mesa's lavapipe Vulkan driver
# (apt-get install mesa-vulkan-drivers). The parity fixtures and every stage against the Python
# reference, as in `make test`. Minimal autotuning: lavapipe compiles each candidate kernel slowly.
test-cubecl:
	XDG_RUNTIME_DIR=$${XDG_RUNTIME_DIR:-/tmp} CUBECL_AUTOTUNE_LEVEL=minimal \
		$(CARGO) test --features wgpu --test parity --test pipeline --test bench --test bad_input -- cubecl_backend

# The Slurm test (tests/slurm/run.sh): needs root; skips with a message where Slurm cannot run.
test-slurm:
	$(CARGO) build
	tests/slurm/run.sh

build:
	$(CARGO) build --release

# The carried binaries of scripts/gpu-bench.sh: qpert and the CUDA parity test (tests/parity.rs, run
# with --ignored), release builds with the cuda feature, stripped and xz-compressed (the device run's
# carry limit is 64 MiB). One cargo invocation builds both: building an integration test builds the
# package's binary too, with the same features, so no crate compiles twice (a separate `cargo build`
# first compiled 75 crates again for the test's dev-dependency features: 32 min cold on 2 cores).
# The build log is tee'd (a cold build takes a while); a failed build leaves no Executable line and
# stops the next step. Then carry target/gpu-bench and run the script there.
# XZ_CARRY compresses what is carried to the device (binaries here, kernel seeds in the preflight):
# xz's strongest preset with a 256 MiB dictionary, one thread (threads cut the input into blocks
# that share nothing). The seeds hold hundreds of near-identical kernels far apart: 2026-11-29, the
# 1253-kernel cubin seed took 12.3 MB at -6, 8.8 MB at -9e, 6.6 MB with this (201 s on one core).
XZ_CARRY := xz -T1 --lzma2=preset=9e,dict=256MiB
export XZ_CARRY
gpu-bench:
	mkdir -p target/gpu-bench
	$(CARGO) test --release --features cuda --test parity --no-run 2>&1 | tee target/gpu-bench/build.log
	strip -o target/gpu-bench/parity "$$(sed -n 's/.*Executable tests\/parity.rs (\(.*\))/\1/p' target/gpu-bench/build.log)"
	$(XZ_CARRY) -f target/gpu-bench/parity
	strip -o target/gpu-bench/qpert $(RELEASE_BIN)
	$(XZ_CARRY) -f target/gpu-bench/qpert
	echo "$(CURDIR)" > target/gpu-bench/manifest-dir
	git describe --always --dirty > target/gpu-bench/commit
	@ls -l target/gpu-bench/
	@echo "gpu-bench: carry target/gpu-bench and run: bash scripts/gpu-bench.sh"

# The carried CUDA binaries run here without a GPU, against a stand-in driver that compiles and
# checks every kernel for an H100 (scripts/cuda-preflight.sh); leaves cache/cubecl/cubin-sm90a.db.xz
# and ptx-sm90.db.xz, the compiled kernels that the device run starts from. Needs pip (installs
# NVIDIA's CUDA 13.0 NVRTC/nvJitLink/header wheels and cbor2 under target/fake-cuda on first use).
cuda-preflight:
	bash scripts/cuda-preflight.sh

# The whole pipeline on the committed mini dataset with a tiny random BLIP-2, on CPU (seconds).
demo:
	rm -rf cache/mini
	$(CARGO) run -- run --config configs/mini.toml
	@echo
	@echo "demo: the report is in cache/mini/report/ (report.md, metrics.json, recall_by_size.svg)."
	@echo "demo: the model is a tiny BLIP-2 with RANDOM weights: its recalls are meaningless; the demo"
	@echo "      shows the pipeline and its artifacts (README: Inspecting artifacts)."

# Other settings for the reproduce targets, e.g. make reproduce-coco QPERT_ARGS="--set rerank.k=128".
QPERT_ARGS ?=
# The GPUs of the reproduce targets: empty, one process on the first GPU (`qpert run`); a list such
# as GPUS=0,1,2,3, one worker per GPU in each sharded stage (pipelines/local/run-gpus.sh; QPERT_ARGS
# then go to every `qpert stage`: --set, --strict, --force, but not run's --from).
GPUS ?=

# $(call reproduce,CONFIG): the whole pipeline of CONFIG on CUDA, on one GPU or on $(GPUS).
define reproduce
	$(CARGO) build --release --features cuda
	$(if $(GPUS),QPERT=$(RELEASE_BIN) QPERT_CONFIG=$(1) pipelines/local/run-gpus.sh --gpus $(GPUS) -- $(QPERT_ARGS),$(RELEASE_BIN) run --config $(1) $(QPERT_ARGS))
endef

# The published Flickr30K evaluation (method.md section 7) on CUDA. Checks its inputs first and says
# what to download where (README: Reproducing the paper).
reproduce-flickr:
	@sh .ci/missing-inputs configs/flickr30k.toml
	$(call reproduce,configs/flickr30k.toml)
	@echo "reproduce-flickr: the report is in cache/flickr30k-test/report/report.md"

# COCO 5K: pre-flight checks (each missing input is named with what to download and where), then
# the whole pipeline on the GPU.
reproduce-coco:
	@echo "make reproduce-coco: checking the inputs of configs/coco.toml"
	@sh .ci/missing-inputs configs/coco.toml
	$(call reproduce,configs/coco.toml)
