#!/usr/bin/env python3
"""PyTorch reference timings for `qpert bench` (issue 6), on the same GPU in the same run.

Builds transformers' Blip2ForImageTextRetrieval from the blip2-itm-vit-g-coco configuration with
random weights (no network, no checkpoint) and times:

  (a) the released Q-Pert evaluation's per-image unit: the ViT on one image, the cross-attention key
      pass of the Q-Former's 6 cross-attention layers, torch.linalg.eigh of 576 64x64 matrices
      (8 boxes x 6 layers x 12 heads) and ITM on 20 pairs (the image's tokens repeated per pair, so
      the cross-attention keys/values are recomputed per pair, as the released loop does);
  (b) a well-batched PyTorch pipeline: ViT at batch 32 and ITM at batch 256 (no key/value reuse),
      in f32 and bf16.

With --qpert-json it reads the report of `qpert bench --json` and prints one table of ratios.
--tiny uses a tiny configuration (for checking this script on a CPU).
"""

import argparse
import json
import sys
import time

import torch
from transformers import Blip2Config, Blip2ForImageTextRetrieval

FLICKR = {"images": 1000, "texts": 5000, "k": 64}
COCO = {"images": 5000, "texts": 25010, "k": 128}
TEXT_LEN = 35


def coco_config():
    """Salesforce/blip2-itm-vit-g-coco: HF defaults plus its Hub config.json fields."""
    return Blip2Config(
        vision_config={"image_size": 364},
        qformer_config={"vocab_size": 30523, "use_qformer_text_input": True},
        num_query_tokens=32,
        image_text_hidden_size=256,
    )


def tiny_config():
    """The shapes of tests/fixtures/tiny_blip2_a."""
    return Blip2Config(
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "image_size": 56, "patch_size": 14},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                        "num_attention_heads": 4, "vocab_size": 30523, "use_qformer_text_input": True},
        num_query_tokens=8,
        image_text_hidden_size=16,
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Mean seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def cross_keys(model):
    """The key projections of the Q-Former's cross-attention layers."""
    return [layer.crossattention.attention.key for layer in model.qformer.encoder.layer
            if hasattr(layer, "crossattention")]


def itm(model, image_embeds, input_ids, attention_mask):
    """ITM logits of pairs (image_embeds[i], text i), as Blip2ForImageTextRetrieval.forward."""
    n = input_ids.shape[0]
    query_tokens = model.query_tokens.expand(n, -1, -1)
    query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=input_ids.device)
    embeds = model.embeddings(input_ids=input_ids, query_embeds=query_tokens)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=input_ids.device)
    out = model.qformer(query_embeds=embeds, query_length=query_tokens.shape[1],
                        attention_mask=torch.cat([query_mask, attention_mask], dim=1),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return model.itm_head(hidden[:, : query_tokens.shape[1], :]).mean(dim=1)[:, 1]


def measure(model, config, device, dtype, args):
    """Per-image unit (f32 only) and batched rates for one dtype."""
    v, q = config.vision_config, config.qformer_config
    heads, head_dim = q.num_attention_heads, q.hidden_size // q.num_attention_heads
    gen = torch.Generator(device="cpu").manual_seed(0)

    def pixels(b):
        return torch.randn(b, 3, v.image_size, v.image_size, generator=gen).to(device, dtype)

    def tokens(n):
        ids = torch.randint(1000, 2000, (n, TEXT_LEN), generator=gen).to(device)
        mask = torch.ones(n, TEXT_LEN, dtype=torch.long, device=device)
        mask[:, 20:] = 0
        return ids, mask

    out = {}
    with torch.inference_mode():
        if dtype == torch.float32:
            one = pixels(1)
            ids20, mask20 = tokens(args.unit_pairs)
            n_mats = args.unit_boxes * len(cross_keys(model)) * heads
            grams = torch.randn(n_mats, head_dim, head_dim, generator=gen, dtype=torch.float64)
            grams = (grams @ grams.transpose(1, 2)).to(device, torch.float32)
            parts = {}

            def vit():
                return model.vision_model(pixel_values=one)[0]

            z = vit()
            parts["vit_s"] = timed(vit, device, args.repeats)
            parts["keys_s"] = timed(lambda: [k(z) for k in cross_keys(model)], device, args.repeats)
            parts["eigh_s"] = timed(lambda: torch.linalg.eigh(grams), device, args.repeats)
            z20 = z.expand(args.unit_pairs, -1, -1)
            parts["itm20_s"] = timed(lambda: itm(model, z20, ids20, mask20), device, args.repeats)

            def unit():
                zz = vit()
                [k(zz) for k in cross_keys(model)]
                torch.linalg.eigh(grams)
                itm(model, zz.expand(args.unit_pairs, -1, -1), ids20, mask20)

            parts["unit_s"] = timed(unit, device, args.repeats)
            parts["eigh_matrices"] = n_mats
            out["released_unit"] = parts

        batch = pixels(args.vit_batch)
        vit_s = timed(lambda: model.vision_model(pixel_values=batch)[0], device, args.repeats)
        out["vit_images_per_s"] = args.vit_batch / vit_s
        z1 = model.vision_model(pixel_values=pixels(1))[0]
        zb = z1.expand(args.itm_batch, -1, -1).contiguous()
        ids, mask = tokens(args.itm_batch)
        itm_s = timed(lambda: itm(model, zb, ids, mask), device, args.repeats)
        out["itm_pairs_per_s"] = args.itm_batch / itm_s
    return out


def released_seconds(unit_s, target, pairs_per_unit):
    """The released loop on a full split: one unit per (image, batch of 20 candidate texts)."""
    pairs = target["images"] * target["k"] + target["texts"] * target["k"]
    return unit_s * pairs / pairs_per_unit


def ratio_table(torch_report, qpert, out=sys.stdout):
    """Prints qpert's numbers against the reference's, one row per quantity."""
    f32, bf16 = torch_report["f32"], torch_report.get("bf16", {})
    unit = f32["released_unit"]
    stage = {s["stage"]: s for s in qpert["stages"]}
    proj = {p["name"]: p for p in qpert["projections"]}
    rerank = stage["rerank"]
    itm_rate = rerank["items"] / rerank["scaled_s"] if rerank["scaled_s"] > 0 else float("nan")
    floor = qpert.get("matmul_floor") or {}
    rows = [
        ("Flickr30K end to end, s", proj["flickr30k"]["total_s"],
         released_seconds(unit["unit_s"], FLICKR, torch_report["unit_pairs"]), "released loop (projected)", True),
        ("COCO 5K end to end, s", proj["coco"]["total_s"],
         released_seconds(unit["unit_s"], COCO, torch_report["unit_pairs"]), "released loop (projected)", True),
        ("extract images/s vs ViT f32 b32", stage["extract"]["per_s"], f32["vit_images_per_s"], "torch f32", False),
        ("extract images/s vs ViT bf16 b32", stage["extract"]["per_s"], bf16.get("vit_images_per_s", float("nan")), "torch bf16", False),
        *[(f"ViT alone ({kernel} attention) images/s vs bf16 b32", 1e3 / ms,
           bf16.get("vit_images_per_s", float("nan")), "torch bf16", False)
          for kernel, ms in qpert.get("vision_ms_per_image", []) if ms],
        *[(f"ITM alone ({kernel} attention) pairs/s vs bf16 b256", rate,
           bf16.get("itm_pairs_per_s", float("nan")), "torch bf16", False)
          for kernel, rate in qpert.get("itm_pairs_per_s", []) if rate],
        *[(f"ITM alone (chunks of {pairs}) pairs/s vs bf16 b256", rate,
           bf16.get("itm_pairs_per_s", float("nan")), "torch bf16", False)
          for pairs, rate in [qpert.get("itm_large_chunk") or (0, None)] if rate],
        *[("ITM alone (runs of 1 pair) pairs/s vs bf16 b256", rate,
           bf16.get("itm_pairs_per_s", float("nan")), "torch bf16", False)
          for rate in [qpert.get("itm_short_runs")] if rate],
        *[(f"{name} vs bf16 {batch}", value, bf16.get(key, float("nan")), "torch bf16", False)
          for name, batch, key, value in [
              ("ViT matmuls alone images/s", "b32", "vit_images_per_s", 1e3 / (floor.get("vision_ms_per_image") or float("inf"))),
              ("ITM matmuls alone pairs/s", "b256", "itm_pairs_per_s", floor.get("itm_pairs_per_s") or 0.0)]
          if value > 0],
        ("ITM pairs/s vs f32 b256", itm_rate, f32["itm_pairs_per_s"], "torch f32", False),
        ("ITM pairs/s vs bf16 b256", itm_rate, bf16.get("itm_pairs_per_s", float("nan")), "torch bf16", False),
    ]
    print(f"qpert on {qpert['device']} ({qpert['model']}), reference on {torch_report['device']} "
          f"(torch {torch_report['torch']})", file=out)
    print(f"{'quantity':<50} {'qpert':>12} {'reference':>12} {'speed-up':>9}  reference", file=out)
    for name, ours, ref, label, lower_is_better in rows:
        speedup = ref / ours if lower_is_better else ours / ref
        print(f"{name:<50} {ours:>12.2f} {ref:>12.2f} {speedup:>8.2f}x  {label}", file=out)
    peaks = [s["gpu_peak_gib"] for s in qpert["stages"] if s["gpu_peak_gib"] is not None]
    gpu = f"{max(peaks):.1f} GiB" if peaks else "n/a"
    print(f"targets (bf16, issue 6): Flickr30K <= 60 s, COCO <= 300 s, ViT >= 150 images/s, "
          f"ITM >= 15000 pairs/s, GPU memory <= 40 GB; qpert peak GPU memory {gpu} "
          f"(qpert ran {qpert.get('precision', 'f32')})", file=out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configuration (CPU check of this script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vit-batch", type=int, default=32)
    p.add_argument("--itm-batch", type=int, default=256)
    p.add_argument("--unit-pairs", type=int, default=20)
    p.add_argument("--unit-boxes", type=int, default=8, help="boxes per image in the released unit (8 x 72 = 576 eigh)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--json", help="write the timings here")
    p.add_argument("--qpert-json", help="a `qpert bench --json` report: print the ratio table")
    p.add_argument("--ratios-only", metavar="TORCH_JSON",
                   help="measure nothing: print the ratio table of this saved report and --qpert-json")
    args = p.parse_args()
    if args.ratios_only:
        if not args.qpert_json:
            p.error("--ratios-only needs --qpert-json")
        with open(args.ratios_only) as f, open(args.qpert_json) as g:
            ratio_table(json.load(f), json.load(g))
        return

    device = torch.device(args.device)
    config = tiny_config() if args.tiny else coco_config()
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = Blip2ForImageTextRetrieval(config).eval()
    build_s = time.perf_counter() - start
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": "tiny" if args.tiny else "blip2-itm-vit-g-coco",
              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "build_s": build_s,
              "unit_pairs": args.unit_pairs}
    report["f32"] = measure(model, config, device, torch.float32, args)
    if not args.no_bf16:
        model = model.to(torch.bfloat16)
        report["bf16"] = measure(model, config, device, torch.bfloat16, args)
    if device.type == "cuda":
        report["torch_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    u = report["f32"]["released_unit"]
    print(f"torch baseline on {report['device']} ({report['config']}, torch {report['torch']}, model built in {build_s:.1f} s)")
    print(f"  released unit (f32): {u['unit_s']:.4f} s = ViT {u['vit_s']:.4f} + keys {u['keys_s']:.4f} + "
          f"eigh of {u['eigh_matrices']} {u['eigh_s']:.4f} + ITM x{args.unit_pairs} {u['itm20_s']:.4f}")
    for dtype in ("f32", "bf16"):
        if dtype in report:
            r = report[dtype]
            print(f"  batched {dtype}: ViT b{args.vit_batch} {r['vit_images_per_s']:.1f} images/s, "
                  f"ITM b{args.itm_batch} {r['itm_pairs_per_s']:.1f} pairs/s")
    for name, target in (("flickr30k", FLICKR), ("coco", COCO)):
        print(f"  released loop projected on {name}: {released_seconds(u['unit_s'], target, args.unit_pairs):.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.qpert_json:
        with open(args.qpert_json) as f:
            ratio_table(report, json.load(f))


if __name__ == "__main__":
    main()
