# qpert: the two commands a newcomer runs are `make test` and (once the model stages land) `make demo`.
# Cargo honours CARGO_TARGET_DIR if set. Tests use the dev profile, whose dependencies are compiled
# with opt-level 3 (Cargo.toml), so `cargo test` is fast without a second, release build.

CARGO ?= cargo

.PHONY: test build demo reproduce-flickr reproduce-coco gpu-bench

test:
	$(CARGO) test

build:
	$(CARGO) build --release

# The carried binary of scripts/gpu-bench.sh: a CUDA release build, stripped and xz-compressed
# (the device run's carry limit is 64 MiB). Then carry target/gpu-bench and run the script there.
GPU_BENCH_BIN = $(or $(CARGO_TARGET_DIR),target)/release/qpert

gpu-bench:
	$(CARGO) build --release --features cuda
	mkdir -p target/gpu-bench
	strip -o target/gpu-bench/qpert $(GPU_BENCH_BIN)
	xz -6 -f target/gpu-bench/qpert
	@ls -l target/gpu-bench/qpert.xz
	@echo "gpu-bench: carry target/gpu-bench and run: bash scripts/gpu-bench.sh"

demo:
	@echo "make demo: not available yet."
	@echo "  Missing: the extract/text/sim/rerank/report stages and the tiny fixture model (issue 5)."
	@echo "  Available now: cargo run -- stage index --config configs/mini.toml"
	@exit 1

reproduce-flickr:
	@echo "make reproduce-flickr: not available yet (needs the model stages, issue 5)."
	@sh .ci/missing-inputs configs/flickr30k.toml
	@exit 1

reproduce-coco:
	@echo "make reproduce-coco: not available yet (needs the model stages, issue 5)."
	@sh .ci/missing-inputs configs/coco.toml
	@exit 1
