# qpert: the two commands a newcomer runs are `make test` and (once the model stages land) `make demo`.
# Cargo honours CARGO_TARGET_DIR if set. Tests use the dev profile, whose dependencies are compiled
# with opt-level 3 (Cargo.toml), so `cargo test` is fast without a second, release build.

CARGO ?= cargo

.PHONY: test build demo reproduce-flickr reproduce-coco

test:
	$(CARGO) test

build:
	$(CARGO) build --release

demo:
	@echo "make demo: not available yet."
	@echo "  Missing: the extract/text/sim/rerank/report stages and the tiny fixture model (issue 5)."
	@echo "  Available now: cargo run -- stage index --config configs/mini.toml"
	@exit 1

reproduce-flickr:
	@echo "make reproduce-flickr: not available yet (needs the model stages, issue 5)."
	@sh .ci/missing-inputs configs/flickr30k.toml || true
	@exit 1

# COCO 5K: pre-flight checks (each missing input is named with what to download and where), then
# the whole pipeline on the GPU. Other settings: make reproduce-coco
# QPERT_ARGS="--set rerank.k=128". Until the report stage lands, `qpert run` stops before it (exit 2).
QPERT_ARGS ?=
reproduce-coco:
	@echo "make reproduce-coco: checking the inputs of configs/coco.toml"
	@sh .ci/missing-inputs configs/coco.toml
	$(CARGO) run --release --features cuda -- run --config configs/coco.toml $(QPERT_ARGS)
