"""End-to-end reference evaluation of the mini Flickr30K fixture (method.md sections 2, 3, 4, 5, 6, 8).

Independent of the Rust code: written from `../shared/spec/method.md`, reusing the float64 BLIP-2
forward and the Q-Pert math of `tools/qpert_reference.py`. For the tiny model
`tests/fixtures/tiny_blip2_a` and the dataset `tests/fixtures/flickr_mini` it computes, per variant,

  split -> boxes/object sizes -> cleaned + tokenised captions -> Pillow images -> ITC features
  (perturbed with Pi for `principal`) -> ITC matrix -> top-k (k = 3) both directions -> ITM on the
  union of selected pairs -> released ranking semantics (separate i2t / t2i matrices, -100 elsewhere)
  -> ranks, recalls, median/mean rank, MRR, object-size bins

and writes `tests/fixtures/e2e/expected_<variant>.json` for `principal` (alpha 8, tau 0.99, constant
weight, principal projector) and `plain` (no perturbation). All numbers come from the float64
forward; the HF `Blip2ForImageTextRetrieval` (with the perturbation hook) is checked against it to
1e-5 on the same inputs.

Run: /work/venv/bin/python tools/reference_e2e.py   (a few seconds on 2 cores). Not run by CI.
"""

from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import BertTokenizer, Blip2ForImageTextRetrieval
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qpert_reference as ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
DATA = os.path.join(FIX, "flickr_mini")
MODEL_NAME = "tiny_blip2_a"
MODEL = os.path.join(FIX, MODEL_NAME)
OUT = os.path.join(FIX, "e2e")

K = 3
MAX_LEN = 35
ORIGIN = 1  # Flickr boxes are 1-based
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEAR_TIE = 1e-4
HF_TOL = 1e-5

VARIANTS = {
    "principal": dict(qpert=True, alpha=8.0, tau=0.99, weight="constant", projector="principal"),
    "plain": dict(qpert=False),
}

# ---------------------------------------------------------------------------------------------
# Section 8: the split
# ---------------------------------------------------------------------------------------------


def load_split(path, image_root):
    """LAVIS JSON -> (image paths, image ids, captions, text->image, image->texts)."""
    with open(path) as f:
        entries = json.load(f)
    paths, ids, captions, txt2img, img2txt = [], [], [], [], []
    for i, e in enumerate(entries):
        p = os.path.join(image_root, e["image"])
        if not os.path.exists(p):
            p = os.path.join(image_root, "flickr30k-images", os.path.basename(e["image"]))
        paths.append(p)
        ids.append(os.path.splitext(os.path.basename(e["image"]))[0])
        img2txt.append([])
        for c in e["caption"]:
            img2txt[i].append(len(captions))
            txt2img.append(i)
            captions.append(c)
    return paths, ids, captions, txt2img, img2txt


# ---------------------------------------------------------------------------------------------
# Section 3: Flickr30K Entities boxes
# ---------------------------------------------------------------------------------------------

CHAIN_RE = re.compile(r"\[/EN#(\d+)((?:/[^\s\]/]+)+)\s")


def sentence_chains(path):
    """Chain ids of every phrase `[/EN#<chain>/<type>[/<type>...] words ...]` in a Sentences file."""
    with open(path, encoding="utf-8") as f:
        return {m.group(1) for line in f for m in CHAIN_RE.finditer(line)}


def parse_annotation(xml_path, sent_path):
    """-> (width, height, kept boxes [[xmin,ymin,xmax,ymax] 1-based ints]) or None if no annotation."""
    if not os.path.exists(xml_path):
        return None
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    width, height = int(size.find("width").text), int(size.find("height").text)
    chains = sentence_chains(sent_path) if os.path.exists(sent_path) else set()
    boxes = []
    for obj in root.findall("object"):
        names = [n.text.strip() for n in obj.findall("name")]
        bb = obj.find("bndbox")
        if bb is None or not any(n in chains for n in names):
            continue
        boxes.append([int(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")])
    return width, height, boxes


# ---------------------------------------------------------------------------------------------
# Section 2: inputs
# ---------------------------------------------------------------------------------------------


def blip_caption(caption, max_words=50):
    """LAVIS `blip_caption` cleaning, in the spec's order."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n")
    caption = caption.strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def tokenise(captions):
    tok = BertTokenizer(os.path.join(MODEL, "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    assert tok.convert_tokens_to_ids("[DEC]") == 30522
    enc = tok(captions, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def load_images(paths, size):
    """Pillow decode -> RGB -> BICUBIC S x S -> /255 -> CLIP normalisation, CHW (float64)."""
    imgs = [Image.open(p) for p in paths]
    arrs = []
    for im in imgs:
        a = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
        a = (a / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
        arrs.append(a.transpose(2, 0, 1))
    pv = torch.from_numpy(np.stack(arrs))
    # cross-check: the HF Pillow image processor gives the same (float32) values
    proc = BlipImageProcessorPil(size={"height": size, "width": size})
    pv_hf = proc(images=imgs, return_tensors="pt")["pixel_values"]
    err = (pv_hf.double() - pv).abs().max().item()
    assert err < 1e-6, f"pixel values vs BlipImageProcessorPil: {err}"
    return pv


# ---------------------------------------------------------------------------------------------
# Section 6: retrieval, ranks and metrics
# ---------------------------------------------------------------------------------------------


def stable_desc(row):
    """Indices by descending score, ties broken by lower index."""
    return np.argsort(-np.asarray(row), kind="stable")


def topk(mat, k):
    return [stable_desc(r)[:k].tolist() for r in mat]


def ranks_i2t(mat, img2txt):
    out = []
    for i, row in enumerate(mat):
        order = stable_desc(row)
        pos = np.empty(len(order), dtype=np.int64)
        pos[order] = np.arange(len(order))
        out.append(int(min(pos[t] for t in img2txt[i])))
    return out


def ranks_t2i(mat_t, txt2img):
    """mat_t [texts, images]."""
    out = []
    for t, row in enumerate(mat_t):
        order = stable_desc(row)
        out.append(int(np.nonzero(order == txt2img[t])[0][0]))
    return out


def recalls(r):
    r = np.asarray(r)
    return [100.0 * float(np.mean(r < k)) for k in (1, 5, 10)]


def metrics(r_i2t, r_t2i, sizes, img2txt):
    tr, ir = recalls(r_i2t), recalls(r_t2i)
    ri, rt = np.asarray(r_i2t) + 1, np.asarray(r_t2i) + 1
    m = {
        "txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2],
        "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2],
        "txt_r_mean": sum(tr) / 3, "img_r_mean": sum(ir) / 3,
    }
    m["r_mean"] = (m["txt_r_mean"] + m["img_r_mean"]) / 2
    m.update({
        "txt_mdr": float(np.median(ri)), "txt_mer": float(np.mean(ri)), "txt_mrr": float(np.mean(1.0 / ri)),
        "img_mdr": float(np.median(rt)), "img_mer": float(np.mean(rt)), "img_mrr": float(np.mean(1.0 / rt)),
    })
    th = np.arange(0, 1.1, 0.1)
    bins = []
    for b in range(10):
        lo, hi = float(th[b]), float(th[b + 1])
        imgs = [i for i, s in enumerate(sizes) if lo <= s < hi]
        txts = [t for i in imgs for t in img2txt[i]]
        e = {"lo": lo, "hi": hi, "n_images": len(imgs), "n_texts": len(txts)}
        tr_b = recalls([r_i2t[i] for i in imgs]) if imgs else [None] * 3
        ir_b = recalls([r_t2i[t] for t in txts]) if txts else [None] * 3
        e.update({"txt_r1": tr_b[0], "txt_r5": tr_b[1], "txt_r10": tr_b[2],
                  "img_r1": ir_b[0], "img_r5": ir_b[1], "img_r10": ir_b[2]})
        bins.append(e)
    m["bins"] = bins
    return m


def topk_gaps(mat, k):
    """Min over rows of (k-th best - (k+1)-th best): decides top-k membership;
    and min adjacent gap inside the top-k (decides its order)."""
    member, inner = np.inf, np.inf
    for row in mat:
        s = np.sort(np.asarray(row))[::-1]
        if len(s) > k:
            member = min(member, s[k - 1] - s[k])
        if k > 1:
            inner = min(inner, float(np.min(s[:k - 1] - s[1:k])))
    return float(member), float(inner)


def rank_gap(mat, gts):
    """Min |s[gt] - s[j]| over each row's ground-truth items gt and all other items j, skipping
    pairs that are both exactly -100 (fixed by index order): how robust the rank decisions are."""
    g = np.inf
    for row, gt in zip(mat, gts):
        row = np.asarray(row)
        for a in gt:
            for j in range(len(row)):
                if j == a or (row[a] == -100.0 and row[j] == -100.0):
                    continue
                g = min(g, abs(row[a] - row[j]))
    return float(g)


# ---------------------------------------------------------------------------------------------
# the evaluation
# ---------------------------------------------------------------------------------------------


def load_sd64():
    raw = load_file(os.path.join(MODEL, "model.safetensors"))
    sd = {}
    for k, v in raw.items():
        if k.endswith("self_attn.q_bias"):
            pre = k[: -len("q_bias")]
            sd[pre + "qkv.bias"] = ref.fuse_qkv_bias(v.double(), raw[pre + "v_bias"].double())
        elif not k.endswith("self_attn.v_bias"):
            sd[k] = v.double()
    return sd


def close(a, b, tol, what):
    err = (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()
    assert err <= tol, f"{what}: max abs diff {err} > {tol}"
    return err


@torch.no_grad()
def main():
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    with open(os.path.join(MODEL, "config.json")) as f:
        cfg = json.load(f)
    vcfg, qcfg = cfg["vision_config"], cfg["qformer_config"]
    nq = cfg["num_query_tokens"]
    S, p = vcfg["image_size"], vcfg["patch_size"]
    H = qcfg["num_attention_heads"]

    paths, ids, raw_caps, txt2img, img2txt = load_split(
        os.path.join(DATA, "annotations", "flickr30k_test.json"), DATA)
    B, N = len(paths), len(raw_caps)

    # boxes, object sizes, patch weights
    ent = os.path.join(DATA, "flickr30k_entities")
    obj_size, box_image, weights, areas, box_list = [], [], [], [], []
    for i, iid in enumerate(ids):
        ann = parse_annotation(os.path.join(ent, "Annotations", iid + ".xml"),
                               os.path.join(ent, "Sentences", iid + ".txt"))
        if ann is None:
            obj_size.append(-1.0)
            box_list.append(None)
            continue
        W_, H_, boxes = ann
        a = [ref.box_area(bx, W_, H_, ORIGIN) for bx in boxes]
        obj_size.append(max(a) if a else 0.0)
        box_list.append(boxes)
        for bx, ar in zip(boxes, a):
            box_image.append(i)
            areas.append(ar)
            weights.append(ref.patch_weights(bx, W_, H_, S, p, ORIGIN))
    w = np.stack(weights)

    clean = [blip_caption(c) for c in raw_caps]
    input_ids, attn = tokenise(clean)
    pv = load_images(paths, S)

    sd = load_sd64()
    _, _, z = ref.vision_forward(sd, vcfg, pv)
    _, txt = ref.text_features(sd, qcfg, input_ids, attn)
    keys = ref.cross_keys(sd, qcfg, z).numpy()  # f64 keys

    hf = Blip2ForImageTextRetrieval.from_pretrained(MODEL, dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    hook = ref.QueryPerturbationHook(hf)
    pv32 = pv.float()
    z_hf = hf.vision_model(pixel_values=pv32).last_hidden_state
    hf_err = {"vision_tokens": close(z, z_hf, 1e-4, "vision tokens")}
    txt_hf = hf(pixel_values=pv32[:1].expand(N, -1, -1, -1), input_ids=input_ids, attention_mask=attn).text_embeds
    hf_err["text_embeds"] = close(txt, txt_hf, HF_TOL, "text_embeds")

    os.makedirs(OUT, exist_ok=True)
    summary = {}
    for variant, vc in VARIANTS.items():
        if vc["qpert"]:
            sub = ref.key_subspaces(keys, w, box_image, H, tau=vc["tau"])
            pi = torch.from_numpy(ref.combine(sub[f"projector_{vc['projector']}"], areas, box_image, B,
                                              vc["alpha"], vc["weight"]))
        else:
            pi = None
        _, img = ref.image_features(sd, qcfg, nq, z, pi=pi)  # [B,Q,E]
        itc = torch.einsum("bqe,ne->bqn", img, txt).max(dim=1).values.numpy()  # [B,N]

        i2t_top = topk(itc, K)
        t2i_top = topk(itc.T, K)
        pairs = sorted({(i, t) for i in range(B) for t in i2t_top[i]}
                       | {(i, t) for t in range(N) for i in t2i_top[t]})
        ii = torch.tensor([a for a, _ in pairs])
        ti = torch.tensor([b for _, b in pairs])
        itm = ref.itm_logits(sd, qcfg, nq, z[ii], input_ids[ti], attn[ti],
                             pi=None if pi is None else pi[ii]).numpy()

        # HF cross-check (hooked, f32 Pi) on the same inputs
        hook.pi = None if pi is None else pi.float()
        qz = hf.qformer(query_embeds=hf.query_tokens.expand(B, -1, -1), encoder_hidden_states=z_hf,
                        encoder_attention_mask=torch.ones(z_hf.shape[:2], dtype=torch.long)).last_hidden_state
        img_hf = torch.nn.functional.normalize(hf.vision_projection(qz), dim=-1)
        hook.pi = None if pi is None else pi.float()[ii]
        itm_hf = hf(pixel_values=pv32[ii], input_ids=input_ids[ti], attention_mask=attn[ti],
                    use_image_text_matching_head=True).logits_per_image[:, 1]
        hook.pi = None
        errs = dict(hf_err)
        errs["image_embeds"] = close(img, img_hf, HF_TOL, f"{variant} image_embeds")
        errs["itc"] = close(itc, torch.einsum("bqe,ne->bqn", img_hf, txt_hf).max(dim=1).values, HF_TOL,
                            f"{variant} itc")
        errs["itm"] = close(itm, itm_hf, HF_TOL, f"{variant} itm")
        if pi is not None:
            # sensitivity: Pi from the HF float32 keys (as an f32 implementation would get them)
            keys32 = torch.stack([hf.qformer.encoder.layer[j].crossattention.attention.key(z_hf)
                                  for j in ref.cross_layers(qcfg)], dim=1).numpy()
            sub32 = ref.key_subspaces(keys32, w, box_image, H, tau=vc["tau"])
            assert np.array_equal(sub32["num_components"], sub["num_components"])
            pi32k = torch.from_numpy(ref.combine(sub32[f"projector_{vc['projector']}"], areas, box_image, B,
                                                 vc["alpha"], vc["weight"]))
            _, img32k = ref.image_features(sd, qcfg, nq, z, pi=pi32k)
            errs["itc_with_pi_from_f32_keys"] = close(
                itc, torch.einsum("bqe,ne->bqn", img32k, txt).max(dim=1).values, HF_TOL, "itc, Pi from f32 keys")
            # images without kept boxes (or without annotation) are not perturbed
            _, img0 = ref.image_features(sd, qcfg, nq, z)
            for i in range(B):
                if i not in box_image:
                    assert torch.equal(img[i], img0[i]), i
                else:
                    assert (img[i] - img0[i]).abs().max() > 1e-2, i

        # released ranking semantics
        i2t = np.full((B, N), -100.0)
        t2i = np.full((N, B), -100.0)
        pair_out = []
        for (i, t), m in zip(pairs, itm):
            sc = float(m) + float(itc[i, t])
            in_i2t, in_t2i = t in i2t_top[i], i in t2i_top[t]
            if in_i2t:
                i2t[i, t] = sc
            if in_t2i:
                t2i[t, i] = sc
            pair_out.append({"image": i, "text": t, "itc": float(itc[i, t]), "itm": float(m), "score": sc,
                             "in_i2t": in_i2t, "in_t2i": in_t2i})
        ranks = {
            "itc": {"i2t": ranks_i2t(itc, img2txt), "t2i": ranks_t2i(itc.T, txt2img)},
            "rerank": {"i2t": ranks_i2t(i2t, img2txt), "t2i": ranks_t2i(t2i, txt2img)},
        }
        mets = {blk: metrics(r["i2t"], r["t2i"], obj_size, img2txt) for blk, r in ranks.items()}

        m_i2t, o_i2t = topk_gaps(itc, K)
        m_t2i, o_t2i = topk_gaps(itc.T, K)
        gaps = {
            "itc_topk_membership_i2t": m_i2t, "itc_topk_membership_t2i": m_t2i,
            "itc_topk_order_i2t": o_i2t, "itc_topk_order_t2i": o_t2i,
            "itc_rank_i2t": rank_gap(itc, img2txt), "itc_rank_t2i": rank_gap(itc.T, [[i] for i in txt2img]),
            "rerank_rank_i2t": rank_gap(i2t, img2txt), "rerank_rank_t2i": rank_gap(t2i, [[i] for i in txt2img]),
        }
        for kk in ("itc_topk_membership_i2t", "itc_topk_membership_t2i"):
            assert gaps[kk] >= NEAR_TIE, f"{variant}: near-tie decides top-k membership ({kk} = {gaps[kk]})"
        near = [kk for kk, v in gaps.items() if v < NEAR_TIE]

        doc = {
            "variant": variant,
            "model": MODEL_NAME,
            "k": K,
            "config": {"dataset": "tests/fixtures/flickr_mini", "split": "annotations/flickr30k_test.json",
                       "max_length": MAX_LEN, "box_origin": ORIGIN, **vc},
            "images": [os.path.relpath(pth, DATA) for pth in paths],
            "captions_clean": clean,
            "object_size": obj_size,
            "n_boxes": [0 if b is None else len(b) for b in box_list],
            "itc": itc.tolist(),
            "i2t_topk": i2t_top,
            "t2i_topk": t2i_top,
            "pairs": pair_out,
            "ranks": ranks,
            "metrics": mets,
            "gaps": gaps,
            "near_ties": near,
            "hf_check_max_abs_diff": errs,
        }
        with open(os.path.join(OUT, f"expected_{variant}.json"), "w") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        summary[variant] = (mets, gaps, errs, len(pairs), near)

    hook.remove()
    for variant, (mets, gaps, errs, npairs, near) in summary.items():
        print(f"== {variant}: {npairs} ITM pairs")
        for blk in ("itc", "rerank"):
            m = mets[blk]
            print(f"  {blk}: " + " ".join(f"{k} {m[k]:.4g}" for k in m if k != "bins"))
        print("  gaps: " + ", ".join(f"{k} {v:.3g}" for k, v in gaps.items()) + f"; near ties: {near}")
        print("  HF vs f64 max abs diff: " + ", ".join(f"{k} {v:.2g}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
