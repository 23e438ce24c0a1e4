"""Independent Python reference for qpert (method.md sections 1, 3, 4 and 5).

Written from `../shared/spec/method.md` only. Two parts:

* a plain functional BLIP-2 ITC/ITM forward (section 1) over a Hugging Face state dict, used to
  cross-check `Blip2ForImageTextRetrieval` and to apply the Q-Pert perturbation without hooks;
* the Q-Pert math: box -> patch weights (section 3), key subspaces and both projector variants
  (section 4), the per-image perturbation matrix Pi and q' = q + q Pi (section 5).

Everything here is NumPy / torch and imported by `tools/make_fixtures.py`. Not run by CI.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Section 1: functional BLIP-2 forward (any float dtype; the fixtures use float64 for the check)
# ---------------------------------------------------------------------------------------------

MASK_MIN = -1e30  # additive mask value; method.md: -10000 or dtype min give identical results


def _lin(x, sd, name):
    w = sd[name + ".weight"]
    b = sd.get(name + ".bias")
    y = x @ w.T
    return y if b is None else y + b


def _ln(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _gelu(x):
    return F.gelu(x)  # exact erf GELU


def _heads(x, h):
    b, n, dim = x.shape
    return x.view(b, n, h, dim // h).transpose(1, 2)  # [b,h,n,d]


def _attend(q, k, v, bias=None):
    """q [b,h,n,d], k/v [b,h,m,d], bias broadcastable to [b,h,n,m] -> [b,n,h*d]."""
    d = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * (d ** -0.5)
    if bias is not None:
        s = s + bias
    a = torch.softmax(s, dim=-1)
    o = a @ v
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def fuse_qkv_bias(q_bias, v_bias):
    """Older exports: qkv.bias = concat(q_bias, zeros, v_bias)."""
    return torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])


def vision_forward(sd, vcfg, pixel_values):
    """Shapes: pixel_values [b,3,s,s] -> (embeddings [b,t,dv], after layer 0 [b,t,dv], z [b,t,dv])."""
    p = vcfg["patch_size"]
    eps = vcfg["layer_norm_eps"]
    nh = vcfg["num_attention_heads"]
    pre = "vision_model."
    x = F.conv2d(pixel_values, sd[pre + "embeddings.patch_embedding.weight"],
                 sd[pre + "embeddings.patch_embedding.bias"], stride=p)
    b = x.shape[0]
    x = x.flatten(2).transpose(1, 2)
    cls = sd[pre + "embeddings.class_embedding"].expand(b, 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[pre + "embeddings.position_embedding"]
    emb = x
    layer0 = None
    for i in range(vcfg["num_hidden_layers"]):
        ln = f"{pre}encoder.layers.{i}."
        h = _ln(x, sd, ln + "layer_norm1", eps)
        qkv = _lin(h, sd, ln + "self_attn.qkv")
        q, k, v = qkv.chunk(3, dim=-1)
        ctx = _attend(_heads(q, nh), _heads(k, nh), _heads(v, nh))
        x = x + _lin(ctx, sd, ln + "self_attn.projection")
        h = _ln(x, sd, ln + "layer_norm2", eps)
        x = x + _lin(_gelu(_lin(h, sd, ln + "mlp.fc1")), sd, ln + "mlp.fc2")
        if i == 0:
            layer0 = x
    z = _ln(x, sd, pre + "post_layernorm", eps)
    return emb, layer0, z


def cross_layers(qcfg):
    """Indices j of the Q-Former layers with cross-attention (j % freq == 0)."""
    f = qcfg["cross_attention_frequency"]
    return [j for j in range(qcfg["num_hidden_layers"]) if j % f == 0]


def cross_keys(sd, qcfg, z):
    """Shapes: z [b,t,dv] -> keys [b,n_cross,t,dq] (K_l = Z W_k^T + b_k of every cross layer)."""
    ks = [_lin(z, sd, f"qformer.encoder.layer.{j}.crossattention.attention.key") for j in cross_layers(qcfg)]
    return torch.stack(ks, dim=1)


def qformer_forward(sd, qcfg, num_query, z=None, input_ids=None, attention_mask=None, pi=None):
    """Post-norm BERT Q-Former.

    Shapes: z [b,t,dv] (needed when num_query > 0), input_ids/attention_mask [b,l],
    pi [b,n_cross,h,d,d] or None -> last hidden state [b,num_query+l,dq].
    pi perturbs the query rows after the query projection of every cross-attention layer:
    q' = q + q Pi (method.md section 5).
    """
    eps = qcfg["layer_norm_eps"]
    nh = qcfg["num_attention_heads"]
    parts = []
    if num_query > 0:
        b = z.shape[0]
        parts.append(sd["query_tokens"].expand(b, -1, -1))
    if input_ids is not None:
        b, L = input_ids.shape
        parts.append(sd["embeddings.word_embeddings.weight"][input_ids]
                     + sd["embeddings.position_embeddings.weight"][:L].unsqueeze(0))
    h = _ln(torch.cat(parts, dim=1), sd, "qformer.layernorm", eps)
    n = h.shape[1]
    if input_ids is not None:
        mask = torch.ones(b, n, dtype=h.dtype)
        mask[:, num_query:] = attention_mask.to(h.dtype)
        bias = ((1.0 - mask) * MASK_MIN)[:, None, None, :]
    else:
        bias = None
    cross = cross_layers(qcfg)
    for j in range(qcfg["num_hidden_layers"]):
        pre = f"qformer.encoder.layer.{j}."
        q = _lin(h, sd, pre + "attention.attention.query")
        k = _lin(h, sd, pre + "attention.attention.key")
        v = _lin(h, sd, pre + "attention.attention.value")
        ctx = _attend(_heads(q, nh), _heads(k, nh), _heads(v, nh), bias)
        h = _ln(_lin(ctx, sd, pre + "attention.output.dense") + h, sd, pre + "attention.output.LayerNorm", eps)
        if num_query > 0:
            hq = h[:, :num_query]
            if j in cross:
                l = cross.index(j)
                cq = _heads(_lin(hq, sd, pre + "crossattention.attention.query"), nh)  # [b,h,q,d]
                if pi is not None:
                    cq = cq + cq @ pi[:, l]  # q' = q + q Pi_{l,h}
                ck = _heads(_lin(z, sd, pre + "crossattention.attention.key"), nh)
                cv = _heads(_lin(z, sd, pre + "crossattention.attention.value"), nh)
                ctx = _attend(cq, ck, cv)
                hq = _ln(_lin(ctx, sd, pre + "crossattention.output.dense") + hq, sd,
                         pre + "crossattention.output.LayerNorm", eps)
            ff = _lin(_gelu(_lin(hq, sd, pre + "intermediate_query.dense")), sd, pre + "output_query.dense")
            hq = _ln(ff + hq, sd, pre + "output_query.LayerNorm", eps)
            if n > num_query:
                ht = h[:, num_query:]
                ff = _lin(_gelu(_lin(ht, sd, pre + "intermediate.dense")), sd, pre + "output.dense")
                ht = _ln(ff + ht, sd, pre + "output.LayerNorm", eps)
                h = torch.cat([hq, ht], dim=1)
            else:
                h = hq
        else:
            ff = _lin(_gelu(_lin(h, sd, pre + "intermediate.dense")), sd, pre + "output.dense")
            h = _ln(ff + h, sd, pre + "output.LayerNorm", eps)
    return h


def image_features(sd, qcfg, num_query, z, pi=None):
    """Shapes: z [b,t,dv] -> (query_output [b,q,dq], image_embeds [b,q,e] L2-normalised)."""
    out = qformer_forward(sd, qcfg, num_query, z=z, pi=pi)
    return out, F.normalize(_lin(out, sd, "vision_projection"), dim=-1)


def text_features(sd, qcfg, input_ids, attention_mask):
    """Shapes: ids [n,l] -> (text_cls [n,dq], text_embeds [n,e] L2-normalised)."""
    out = qformer_forward(sd, qcfg, 0, input_ids=input_ids, attention_mask=attention_mask)
    cls = out[:, 0]
    return cls, F.normalize(_lin(cls, sd, "text_projection"), dim=-1)


def itm_logits(sd, qcfg, num_query, z, input_ids, attention_mask, pi=None):
    """Shapes: z [p,t,dv] (already gathered per pair), ids [p,l] -> [p] mean over queries of itm[...,1]."""
    out = qformer_forward(sd, qcfg, num_query, z=z, input_ids=input_ids, attention_mask=attention_mask, pi=pi)
    return _lin(out[:, :num_query], sd, "itm_head")[..., 1].mean(dim=1)


# ---------------------------------------------------------------------------------------------
# Section 3: box -> token weights (exactly the released pipeline)
# ---------------------------------------------------------------------------------------------


def shifted_box(box, origin=1):
    """Annotation box [xmin,ymin,xmax,ymax] -> float coordinates minus the origin (Flickr: 1)."""
    return [float(c) - origin for c in box]


def box_area(box, width, height, origin=1):
    """a = (xmax - xmin) * (ymax - ymin) / (H * W) on the shifted, unclamped coordinates."""
    x0, y0, x1, y1 = shifted_box(box, origin)
    return (x1 - x0) * (y1 - y0) / (height * width)


def box_mask(box, width, height, origin=1):
    """m = zeros(H, W); m[int(ymin):int(ymax), int(xmin):int(xmax)] = 1 (Python slicing clamps)."""
    x0, y0, x1, y1 = shifted_box(box, origin)
    m = np.zeros((height, width), dtype=np.float32)
    m[int(y0):int(y1), int(x0):int(x1)] = 1
    return m


def patch_weights(box, width, height, image_size, patch_size, origin=1):
    """Box -> w [T]: bilinear resize (half-pixel, no antialias, f32) to S x S, > 0, p x p block means, CLS 0."""
    m = torch.from_numpy(box_mask(box, width, height, origin))[None, None]
    r = F.interpolate(m, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)
    r = (r[0, 0] > 0).to(torch.float64).numpy()
    g = image_size // patch_size
    blocks = r.reshape(g, patch_size, g, patch_size).sum(axis=(1, 3)) / (patch_size * patch_size)
    return np.concatenate([[0.0], blocks.reshape(-1)])


def bilinear_resize_reference(m, s):
    """Pure NumPy f32 re-statement of method.md section 3 step 2 (used to check torch's kernel)."""
    def axis(n):
        scale = np.float32(n) / np.float32(s)
        o = np.arange(s, dtype=np.float32)
        src = np.maximum(np.float32(0), (o + np.float32(0.5)) * scale - np.float32(0.5)).astype(np.float32)
        i0 = np.floor(src).astype(np.int64)
        i0 = np.minimum(i0, n - 1)
        i1 = np.minimum(i0 + 1, n - 1)
        t = (src - i0.astype(np.float32)).astype(np.float32)
        return i0, i1, t
    h, w = m.shape
    y0, y1, ty = axis(h)
    x0, x1, tx = axis(w)
    m = m.astype(np.float32)
    top = m[y0][:, x0] * (1 - tx) + m[y0][:, x1] * tx
    bot = m[y1][:, x0] * (1 - tx) + m[y1][:, x1] * tx
    return (top * (1 - ty)[:, None] + bot * ty[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Section 4: key subspaces and projectors
# ---------------------------------------------------------------------------------------------


def gram(keys_h, w):
    """C = sum_t w_t^2 k_t k_t^T in float64. keys_h [T,d], w [T] -> [d,d]."""
    kw = keys_h.astype(np.float64) * w[:, None]
    return kw.T @ kw


def eigh_desc(c):
    """Eigen-decomposition with eigenvalues descending; V's columns are the eigenvectors."""
    lam, v = np.linalg.eigh(c)
    order = np.argsort(-lam, kind="stable")
    return lam[order], v[:, order]


def sign_fix(v):
    """Official-variant convention: each eigenvector (column) gets its largest-|.| entry positive
    (the first such entry on ties)."""
    v = v.copy()
    for i in range(v.shape[1]):
        j = int(np.argmax(np.abs(v[:, i])))  # argmax returns the first maximum
        if v[j, i] < 0:
            v[:, i] = -v[:, i]
    return v


def num_components(lam, tau=None, n=None):
    """m = max(1, #{j: cumsum_j / sum < tau}) (strict); an integer n gives m = n."""
    if n is not None:
        return int(n)
    total = lam.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.cumsum(lam) / total
    return max(1, int(np.sum(ratios < tau)))


def projector_principal(v, m):
    """P = V_m V_m^T (top-m eigenvectors, columns)."""
    vm = v[:, :m]
    return vm @ vm.T


def projector_official(v, m):
    """Released code: rows m+1..d of V zeroed, P~ = V^T D_m V = sum_{i<m} r_i r_i^T (rows of V)."""
    vs = sign_fix(v)
    r = vs[:m, :]
    return r.T @ r


AREA_WEIGHTS = {
    "constant": lambda alpha, a: alpha,
    "norm_area": lambda alpha, a: alpha * a,
    "norm_area_inv": lambda alpha, a: -alpha * a,
    "centered_area": lambda alpha, a: alpha * (a - 0.5),
    "centered_area_inv": lambda alpha, a: alpha * (0.5 - a),
}


def combine(projectors, areas, box_image, n_images, alpha, weight="constant"):
    """Pi per image = mean over its boxes o of alpha_o * P_o (zeros when the image has no box).

    projectors [n_boxes, n_cross, h, d, d] -> [n_images, n_cross, h, d, d] (float64)."""
    f = AREA_WEIGHTS[weight]
    out = np.zeros((n_images,) + projectors.shape[1:], dtype=np.float64)
    for i in range(n_images):
        idx = [o for o in range(len(box_image)) if box_image[o] == i]
        if idx:
            out[i] = np.mean([f(alpha, areas[o]) * projectors[o] for o in idx], axis=0)
    return out


def key_subspaces(keys, w, box_image, n_heads, tau=0.99, npc=None):
    """All subspace quantities for every box.

    keys [b, n_cross, T, dq] (float32 as the model computes them), w [n_boxes, T].
    Returns a dict of float64 / int arrays indexed [n_boxes, n_cross, h, ...]."""
    nb = w.shape[0]
    _, nl, t, dq = keys.shape
    d = dq // n_heads
    res = {
        "gram": np.zeros((nb, nl, n_heads, d, d)),
        "eigenvalues": np.zeros((nb, nl, n_heads, d)),
        "eigenvectors": np.zeros((nb, nl, n_heads, d, d)),
        "num_components": np.zeros((nb, nl, n_heads), dtype=np.int64),
        "projector_principal": np.zeros((nb, nl, n_heads, d, d)),
        "projector_official": np.zeros((nb, nl, n_heads, d, d)),
        "projector_principal_n2": np.zeros((nb, nl, n_heads, d, d)),
        "ratio_margin": np.zeros((nb, nl, n_heads)),
        "eigengap_min": np.zeros((nb, nl, n_heads)),
        "eigengap_at_m": np.zeros((nb, nl, n_heads)),
    }
    for o in range(nb):
        kb = keys[box_image[o]]
        for l in range(nl):
            for h in range(n_heads):
                c = gram(kb[l, :, h * d:(h + 1) * d], w[o])
                lam, v = eigh_desc(c)
                m = num_components(lam, tau=tau)
                res["gram"][o, l, h] = c
                res["eigenvalues"][o, l, h] = lam
                res["eigenvectors"][o, l, h] = v
                res["num_components"][o, l, h] = m
                res["projector_principal"][o, l, h] = projector_principal(v, m)
                res["projector_official"][o, l, h] = projector_official(v, m)
                res["projector_principal_n2"][o, l, h] = projector_principal(v, num_components(lam, n=2))
                for pm in (res["projector_principal"][o, l, h], res["projector_official"][o, l, h]):
                    assert np.allclose(pm @ pm, pm, atol=1e-9) and np.allclose(pm, pm.T, atol=1e-12)
                    assert abs(np.trace(pm) - m) < 1e-9
                res["ratio_margin"][o, l, h] = np.min(np.abs(np.cumsum(lam) / lam.sum() - tau))
                res["eigengap_min"][o, l, h] = np.min(lam[:-1] - lam[1:]) / lam[0]
                res["eigengap_at_m"][o, l, h] = (lam[m - 1] - lam[m]) / lam[0] if m < d else 1.0
    return res


# ---------------------------------------------------------------------------------------------
# Section 5: the perturbation as a hook on the Hugging Face model
# ---------------------------------------------------------------------------------------------


class QueryPerturbationHook:
    """Adds q Pi to the cross-attention query projection output of every cross layer of an HF
    `Blip2ForImageTextRetrieval`. Set `.pi` to a float32 tensor [b, n_cross, h, d, d] (b = batch of
    the next forward) or None (no-op)."""

    def __init__(self, model):
        qcfg = model.config.qformer_config
        self.n_heads = qcfg.num_attention_heads
        self.pi = None
        self.handles = []
        layers = [j for j in range(qcfg.num_hidden_layers) if j % qcfg.cross_attention_frequency == 0]
        for l, j in enumerate(layers):
            mod = model.qformer.encoder.layer[j].crossattention.attention.query
            self.handles.append(mod.register_forward_hook(self._make(l)))

    def _make(self, l):
        def hook(module, inputs, output):
            if self.pi is None:
                return output
            b, nq, dq = output.shape
            q = output.view(b, nq, self.n_heads, dq // self.n_heads)
            q = q + torch.einsum("bqhd,bhde->bqhe", q, self.pi[:, l].to(q.dtype))
            return q.reshape(b, nq, dq)
        return hook

    def remove(self):
        for hd in self.handles:
            hd.remove()
