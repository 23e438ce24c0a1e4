"""Generate the tiny random BLIP-2 parity fixtures in tests/fixtures/tiny_blip2_{a,b}/.

For each config: build a `Blip2ForImageTextRetrieval` with explicitly seeded O(1) weights, save it in
Hugging Face format, preprocess the fixture photos and captions with the HF processors, and record
every intermediate (reference.safetensors) plus the Q-Pert quantities (qpert.safetensors,
qpert.json). Every number comes from the HF model's own forward where one exists; an independent
float64 re-implementation (tools/qpert_reference.py) must agree with it, and the script asserts so.

Run: .venv/bin/python tools/make_fixtures.py   (about a minute on 2 CPU cores). Not run by CI.
See tools/README.md and tests/fixtures/README.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file
from transformers import BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qpert_reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
IMAGES = ["astronaut.jpg", "camera.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
VOCAB = os.path.join(ROOT, "..", "..", "shared", "assets", "bert-base-uncased", "vocab.txt")
if not os.path.exists(VOCAB):
    VOCAB = "/work/shared/assets/bert-base-uncased/vocab.txt"
MAX_LEN = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CAPTIONS = [
    "A woman in an orange spacesuit holds a flag.",
    "a man  with a camera\ton a tripod",
    "A tabby cat's face, close-up: whiskers & green eyes!",
    "Café crème: an espresso cup on a saucer, with a spoon (wooden table).",
    "The ROCKET stands on the launch pad; steam rises...",
    "[CLS] a cat [SEP] sits on a mat",
    "a very long caption that goes on and on about the photograph, describing the sky, the clouds, "
    "the ground, the people standing near the fence, their hats, their shoes, and the dog that runs "
    "across the field chasing a bright red ball",
    "naïve résumé of a piñata at the fiancée's soirée",
    "東京 skyline at night 🌃 with \"quotes\" and #hashtags",
    "",
]

# (image index, text index) pairs for ITM; several share an image, coffee (index 3) has no boxes.
ITM_PAIRS = [(0, 0), (0, 5), (0, 6), (1, 1), (1, 9), (2, 2), (2, 5), (3, 3), (3, 7), (4, 4), (4, 8), (2, 0)]

# Flickr-style 1-based integer boxes [xmin, ymin, xmax, ymax] per image (image sizes in PROVENANCE.md).
BOXES = {
    "astronaut.jpg": [[1, 1, 500, 512], [200, 100, 221, 120], [100, 250, 300, 480], [400, 300, 560, 530]],
    "camera.jpg": [[1, 40, 290, 420], [60, 60, 470, 470], [200, 1, 512, 300]],
    "chelsea.jpg": [[1, 1, 451, 300], [120, 40, 330, 280], [300, 150, 480, 330], [10, 240, 42, 275]],
    "coffee.jpg": [],
    "rocket.jpg": [[280, 1, 420, 427], [500, 300, 700, 450], [20, 20, 48, 45]],
}

CONFIGS = {
    "tiny_blip2_a": dict(
        seed=20260127,
        vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    image_size=56, patch_size=14),
        qformer=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     cross_attention_frequency=2, vocab_size=30523, use_qformer_text_input=True),
        num_query_tokens=8, image_text_hidden_size=16,
        store_dtype=torch.float32, legacy_qv_bias=False,
    ),
    "tiny_blip2_b": dict(
        seed=20260128,
        vision=dict(hidden_size=36, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                    image_size=42, patch_size=7, layer_norm_eps=1e-5),
        qformer=dict(hidden_size=48, num_hidden_layers=5, num_attention_heads=3, intermediate_size=80,
                     cross_attention_frequency=2, vocab_size=30523, use_qformer_text_input=True,
                     max_position_embeddings=40),
        num_query_tokens=6, image_text_hidden_size=12,
        store_dtype=torch.float16, legacy_qv_bias=True,
    ),
}

ALPHA = 8.0
TAU = 0.99


def build_model(c):
    config = Blip2Config(vision_config=c["vision"], qformer_config=c["qformer"],
                         num_query_tokens=c["num_query_tokens"],
                         image_text_hidden_size=c["image_text_hidden_size"])
    model = Blip2ForImageTextRetrieval(config).eval()
    model.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(c["seed"])
    dv = c["vision"]["hidden_size"]
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            last = name.split(".")[-2] if "." in name else name
            if name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=gen)
                if name.endswith("self_attn.qkv.bias"):
                    v[dv:2 * dv] = 0.0  # k bias slice: zero as in real checkpoints
            elif last.lower() in ("layer_norm1", "layer_norm2", "post_layernorm", "layernorm"):
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name in ("query_tokens", "vision_model.embeddings.class_embedding",
                          "vision_model.embeddings.position_embedding",
                          "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
                v = torch.randn(p.shape, generator=gen)
            elif p.dim() >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                v = torch.randn(p.shape, generator=gen) / np.sqrt(fan_in)
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")
            # store exactly the values the file will hold (fp16 / bf16 rounding), computed in f32
            p.copy_(v.to(c["store_dtype"]).to(torch.float32))
    return model


def save_model(model, c, out):
    os.makedirs(out, exist_ok=True)
    model.config.dtype = {torch.float32: "float32", torch.float16: "float16",
                          torch.bfloat16: "bfloat16"}[c["store_dtype"]]
    model.config.save_pretrained(out)
    sd = {k: v.detach().to(c["store_dtype"]).contiguous() for k, v in model.state_dict().items()}
    dv = model.config.vision_config.hidden_size
    if c["legacy_qv_bias"]:
        for k in [k for k in sd if k.endswith("self_attn.qkv.bias")]:
            b = sd.pop(k)
            assert torch.all(b[dv:2 * dv] == 0)
            pre = k[: -len("qkv.bias")]
            sd[pre + "q_bias"] = b[:dv].clone()
            sd[pre + "v_bias"] = b[2 * dv:].clone()
        save_file(sd, os.path.join(out, "model.safetensors"))  # no __metadata__, like the real checkpoint
    else:
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(VOCAB, os.path.join(out, "vocab.txt"))


def load_state_dict_f32(folder):
    """Read model.safetensors back (fusing q_bias/v_bias) as float32: the round-trip check."""
    raw = load_file(os.path.join(folder, "model.safetensors"))
    sd = {}
    for k, v in raw.items():
        if k.endswith("self_attn.q_bias"):
            pre = k[: -len("q_bias")]
            sd[pre + "qkv.bias"] = ref.fuse_qkv_bias(v.float(), raw[pre + "v_bias"].float())
        elif k.endswith("self_attn.v_bias"):
            continue
        else:
            sd[k] = v.float()
    return sd


def preprocess_images(size):
    proc = BlipImageProcessorPil(size={"height": size, "width": size})
    assert proc.resample == Image.Resampling.BICUBIC and proc.do_rescale and proc.do_normalize
    assert tuple(proc.image_mean) == CLIP_MEAN and tuple(proc.image_std) == CLIP_STD
    imgs = [Image.open(os.path.join(FIX, "images", n)) for n in IMAGES]
    pv = proc(images=imgs, return_tensors="pt")["pixel_values"].float()
    # Independent check: Pillow BICUBIC resize of the RGB image, /255, CLIP normalisation.
    for i, im in enumerate(imgs):
        a = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        a = (a / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        diff = np.abs(a.transpose(2, 0, 1) - pv[i].numpy()).max()
        assert diff < 1e-6, (IMAGES[i], diff)
    return pv, [im.size for im in imgs]  # (width, height)


def tokenise(folder):
    tok = BertTokenizer(os.path.join(folder, "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    assert tok.convert_tokens_to_ids("[DEC]") == 30522
    enc = tok(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def compact_json(obj):
    """Indented JSON with innermost integer lists (boxes, indices) kept on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)


def close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err} > {tol}"
    return err


def capture(module, store, key):
    return module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o.detach().clone()))


@torch.no_grad()
def run_reference(name, c):
    out = os.path.join(FIX, name)
    model = build_model(c)
    save_model(model, c, out)

    # Round trip: the file (fused if legacy) equals the in-memory model's parameters.
    sd_file = load_state_dict_f32(out)
    sd_mem = {k: v for k, v in model.state_dict().items()}
    assert set(sd_file) == set(sd_mem), set(sd_file) ^ set(sd_mem)
    for k in sd_mem:
        assert torch.equal(sd_file[k], sd_mem[k]), k
    if not c["legacy_qv_bias"]:
        re = Blip2ForImageTextRetrieval.from_pretrained(out, dtype=torch.float32).eval()
        for k, v in re.state_dict().items():
            assert torch.equal(v, sd_mem[k]), k

    vcfg = model.config.vision_config.to_dict()
    qcfg = model.config.qformer_config.to_dict()
    nq = model.config.num_query_tokens
    S = vcfg["image_size"]

    pv, sizes = preprocess_images(S)
    ids, mask = tokenise(out)
    B, N = pv.shape[0], ids.shape[0]

    # --- HF model -----------------------------------------------------------------------------
    cap = {}
    hs = [capture(model.vision_model.embeddings, cap, "emb"),
          capture(model.vision_model.encoder.layers[0], cap, "l0")]
    itc_out = model(pixel_values=pv, input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    z = itc_out.vision_model_output.last_hidden_state
    text_cls = itc_out.text_model_output.last_hidden_state[:, 0]
    qz = model.qformer(query_embeds=model.query_tokens.expand(B, -1, -1), encoder_hidden_states=z,
                       encoder_attention_mask=torch.ones(z.shape[:2], dtype=torch.long)).last_hidden_state
    image_embeds = torch.nn.functional.normalize(model.vision_projection(qz), dim=-1)
    assert torch.equal(image_embeds, itc_out.image_embeds)
    text_embeds = itc_out.text_embeds
    itc = torch.einsum("bqe,ne->bqn", image_embeds, text_embeds).max(dim=1).values
    close(itc, itc_out.logits_per_image, 1e-6, "itc vs HF logits_per_image")

    ii = torch.tensor([p[0] for p in ITM_PAIRS])
    ti = torch.tensor([p[1] for p in ITM_PAIRS])

    def hf_itm():
        o = model(pixel_values=pv[ii], input_ids=ids[ti], attention_mask=mask[ti], use_image_text_matching_head=True)
        return o.logits_per_image[:, 1]

    itm = hf_itm()
    # ITM by definition: mean over query rows of itm_head(joint output)[..., 1]
    qa = torch.cat([torch.ones(len(ii), nq, dtype=torch.long), mask[ti]], dim=1)
    emb = model.embeddings(input_ids=ids[ti], query_embeds=model.query_tokens.expand(len(ii), -1, -1))
    joint = model.qformer(query_embeds=emb, query_length=nq, attention_mask=qa, encoder_hidden_states=z[ii],
                          encoder_attention_mask=torch.ones(len(ii), z.shape[1], dtype=torch.long)).last_hidden_state
    close(model.itm_head(joint[:, :nq])[..., 1].mean(dim=1), itm, 1e-6, "itm definition vs HF")

    # --- independent float64 re-implementation -------------------------------------------------
    sd64 = {k: v.double() for k, v in sd_file.items()}
    emb64, l064, z64 = ref.vision_forward(sd64, vcfg, pv.double())
    errs = {}
    errs["vision_embeddings"] = close(emb64, cap["emb"], 1e-4, "vision_embeddings")
    errs["vision_layer0"] = close(l064, cap["l0"], 1e-4, "vision_layer0")
    errs["vision_tokens"] = close(z64, z, 1e-4, "vision_tokens")
    q64, ie64 = ref.image_features(sd64, qcfg, nq, z64)
    errs["query_output"] = close(q64, qz, 1e-4, "query_output")
    errs["image_embeds"] = close(ie64, image_embeds, 1e-5, "image_embeds")
    tc64, te64 = ref.text_features(sd64, qcfg, ids, mask)
    errs["text_cls"] = close(tc64, text_cls, 1e-4, "text_cls")
    errs["text_embeds"] = close(te64, text_embeds, 1e-5, "text_embeds")
    itm64 = ref.itm_logits(sd64, qcfg, nq, z64[ii], ids[ti], mask[ti])
    errs["itm_logits"] = close(itm64, itm, 1e-4, "itm_logits")

    reference = {
        "pixel_values": pv, "input_ids": ids, "attention_mask": mask,
        "vision_embeddings": cap["emb"], "vision_layer0": cap["l0"], "vision_tokens": z,
        "query_output": qz, "image_embeds": image_embeds, "text_cls": text_cls, "text_embeds": text_embeds,
        "itc": itc, "itm_image_index": ii.long(), "itm_text_index": ti.long(), "itm_logits": itm,
    }
    reference = {k: (v.float() if v.is_floating_point() else v.long()).contiguous() for k, v in reference.items()}
    save_file(reference, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "captions.json"), "w") as f:
        json.dump(CAPTIONS, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(out, "images.json"), "w") as f:
        json.dump(IMAGES, f, indent=1)
        f.write("\n")
    stats = {k: float(v.abs().max()) for k, v in reference.items() if v.is_floating_point()}
    print(f"{name}: reference max |x|: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    print(f"{name}: f64 re-implementation max abs diff: " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))

    run_qpert(name, out, model, sd64, vcfg, qcfg, nq, pv, ids, mask, z, z64, ii, ti, sizes, image_embeds, itm)


def run_qpert(name, out, model, sd64, vcfg, qcfg, nq, pv, ids, mask, z, z64, ii, ti, sizes, image_embeds, itm):
    S, p = vcfg["image_size"], vcfg["patch_size"]
    H = qcfg["num_attention_heads"]
    d = qcfg["hidden_size"] // H
    B = pv.shape[0]

    # --- boxes -> patch weights ------------------------------------------------------------------
    boxes, box_image, areas, weights = [], [], [], []
    for i, img in enumerate(IMAGES):
        W_, H_ = sizes[i]
        for bx in BOXES[img]:
            w = ref.patch_weights(bx, W_, H_, S, p)
            m = ref.box_mask(bx, W_, H_)
            r_t = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=(S, S), mode="bilinear",
                                                  align_corners=False, antialias=False)[0, 0].numpy()
            r_n = ref.bilinear_resize_reference(m, S)
            assert np.array_equal(r_t > 0, r_n > 0), (img, bx)
            assert np.abs(r_t - r_n).max() < 1e-6
            assert w.sum() > 0, f"{img} {bx}: empty mask"
            boxes.append(bx)
            box_image.append(i)
            areas.append(ref.box_area(bx, W_, H_))
            weights.append(w)
    w = np.stack(weights)
    nb = len(boxes)

    # --- key subspaces ------------------------------------------------------------------------------
    keys = torch.stack([model.qformer.encoder.layer[j].crossattention.attention.key(z)
                        for j in ref.cross_layers(qcfg)], dim=1)  # HF f32 keys [b,n_cross,t,dq]
    close(ref.cross_keys(sd64, qcfg, z64), keys, 1e-4, "cross_keys")
    keys_np = keys.numpy()
    sub = ref.key_subspaces(keys_np, w, box_image, H, tau=TAU)
    nonzero = (w > 0).sum(axis=1)
    gram_rank = np.broadcast_to(np.minimum(nonzero, d)[:, None, None], sub["num_components"].shape).astype(np.int64)
    full = gram_rank == d
    # numerical sanity: rank-deficient Gram matrices really have ~zero trailing eigenvalues
    for o in range(nb):
        if nonzero[o] < d:
            lam = sub["eigenvalues"][o]
            assert np.all(np.abs(lam[..., nonzero[o]:]) <= 1e-9 * lam[..., :1]), o
    image_official_comparable = np.array(
        [all(full[o].all() for o in range(nb) if box_image[o] == i) for i in range(B)], dtype=np.uint8)

    pis = {}
    for variant in ("principal", "official"):
        pis[f"pi_{variant}_constant"] = ref.combine(sub[f"projector_{variant}"], areas, box_image, B, ALPHA)
    for wname in ("norm_area", "norm_area_inv", "centered_area", "centered_area_inv"):
        pis[f"pi_principal_{wname}"] = ref.combine(sub["projector_principal"], areas, box_image, B, ALPHA, wname)

    # --- perturbed features: HF model + hook, checked against the f64 re-implementation -------------
    hook = ref.QueryPerturbationHook(model)
    results = {}
    # the hook is a no-op for Pi = 0
    hook.pi = torch.zeros((B,) + pis["pi_principal_constant"].shape[1:])
    ie0 = torch.nn.functional.normalize(model.vision_projection(model.qformer(
        query_embeds=model.query_tokens.expand(B, -1, -1), encoder_hidden_states=z,
        encoder_attention_mask=torch.ones(z.shape[:2], dtype=torch.long)).last_hidden_state), dim=-1)
    assert torch.equal(ie0, image_embeds), "hook with Pi = 0 changed image_embeds"
    hook.pi = hook.pi[ii]
    o = model(pixel_values=pv[ii], input_ids=ids[ti], attention_mask=mask[ti], use_image_text_matching_head=True)
    assert torch.equal(o.logits_per_image[:, 1], itm), "hook with Pi = 0 changed itm"
    errs = {}
    for variant in ("principal", "official"):
        pi32 = torch.from_numpy(pis[f"pi_{variant}_constant"]).float()
        hook.pi = pi32
        qz = model.qformer(query_embeds=model.query_tokens.expand(B, -1, -1), encoder_hidden_states=z,
                           encoder_attention_mask=torch.ones(z.shape[:2], dtype=torch.long)).last_hidden_state
        ie = torch.nn.functional.normalize(model.vision_projection(qz), dim=-1)
        hook.pi = pi32[ii]
        o = model(pixel_values=pv[ii], input_ids=ids[ti], attention_mask=mask[ti], use_image_text_matching_head=True)
        it = o.logits_per_image[:, 1]
        _, ie64 = ref.image_features(sd64, qcfg, nq, z64, pi=pi32.double())
        it64 = ref.itm_logits(sd64, qcfg, nq, z64[ii], ids[ti], mask[ti], pi=pi32.double()[ii])
        errs[f"image_embeds_{variant}"] = close(ie64, ie, 1e-5, f"image_embeds_{variant}")
        errs[f"itm_logits_{variant}"] = close(it64, it, 1e-4, f"itm_logits_{variant}")
        # no box -> unperturbed
        for i in range(B):
            if not any(bi == i for bi in box_image):
                assert torch.equal(ie[i], image_embeds[i])
        results[f"image_embeds_{variant}"] = ie
        results[f"itm_logits_{variant}"] = it
        # perturbation must actually change images with boxes
        assert (ie - image_embeds).abs().max() > 1e-2
    hook.remove()

    t32 = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    tensors = {
        "patch_weights": t32(w), "box_area": t32(np.array(areas)), "box_image": torch.tensor(box_image).long(),
        "cross_keys": keys,
        "gram": t32(sub["gram"]), "eigenvalues": t32(sub["eigenvalues"]),
        "num_components": torch.from_numpy(sub["num_components"]).long(),
        "projector_principal": t32(sub["projector_principal"]),
        "projector_official": t32(sub["projector_official"]),
        "projector_principal_n2": t32(sub["projector_principal_n2"]),
        "gram_rank": torch.from_numpy(gram_rank.copy()).long(),
        "gram_full_rank": torch.from_numpy(full.astype(np.uint8)),
        "eigengap_min": t32(sub["eigengap_min"]), "eigengap_at_m": t32(sub["eigengap_at_m"]),
        "ratio_margin": t32(sub["ratio_margin"]),
        "image_official_comparable": torch.from_numpy(image_official_comparable),
    }
    tensors.update({k: t32(v) for k, v in pis.items()})
    tensors.update({k: v.float() for k, v in results.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, "qpert.safetensors"))

    meta = {
        "origin": 1,
        "alpha": ALPHA,
        "tau": TAU,
        "npc_integer_case": 2,
        "images": [
            {"file": img, "width": sizes[i][0], "height": sizes[i][1], "boxes": BOXES[img],
             "box_indices": [o for o in range(nb) if box_image[o] == i]}
            for i, img in enumerate(IMAGES)
        ],
        "images_without_boxes": [img for img in IMAGES if not BOXES[img]],
        "clamped_boxes": [
            {"image": IMAGES[box_image[o]], "box": boxes[o]} for o in range(nb)
            if boxes[o][2] - 1 > sizes[box_image[o]][0] or boxes[o][3] - 1 > sizes[box_image[o]][1]
        ],
        "cross_attention_layers": ref.cross_layers(qcfg),
        "heads": H,
        "head_dim": d,
    }
    with open(os.path.join(out, "qpert.json"), "w") as f:
        f.write(compact_json(meta) + "\n")
    nfull = int(full[:, 0, 0].sum())
    print(f"{name}: {nb} boxes, {nfull} full rank, num_components range "
          f"{sub['num_components'].min()}..{sub['num_components'].max()}, min tau margin "
          f"{sub['ratio_margin'].min():.2e}, min rel eigengap (full rank) "
          f"{sub['eigengap_min'][full].min():.2e}, min rel gap at m {sub['eigengap_at_m'].min():.2e}, official-comparable images {image_official_comparable.tolist()}")
    print(f"{name}: f64 perturbed re-implementation max abs diff: "
          + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))


def main():
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    names = sys.argv[1:] or list(CONFIGS)
    for name in names:
        run_reference(name, CONFIGS[name])


if __name__ == "__main__":
    main()
