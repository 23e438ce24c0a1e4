# qpert: the two commands a newcomer runs are `make test` and (once the model stages land) `make demo`.
# Cargo honours CARGO_TARGET_DIR if set. Tests use the dev profile, whose dependencies are compiled
# with opt-level 3 (Cargo.toml), so `cargo test` is fast without a second, release build.

CARGO ?= cargo

.PHONY: test test-slurm build demo reproduce-flickr reproduce-coco

test:
	$(CARGO) test

# The Slurm test (tests/slurm/run.sh): needs root; skips with a message where Slurm cannot run.
test-slurm:
	$(CARGO) build
	tests/slurm/run.sh

build:
	$(CARGO) build --release

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
