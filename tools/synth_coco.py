#!/usr/bin/env python3
"""Writes a synthetic COCO 5K evaluation of the real size, to measure the `index` stage's memory
and time without the real data (the README's numbers come from it):

  OUT/coco_entities_release.json   COCO Entities' structure, ~400 MB (like the release), IMAGES images
  OUT/annotations/coco_karpathy_test.json   a LAVIS split of 5,000 images / 25,010 captions, of which
                                            the five real ids COCO Entities lacks are absent from it
  OUT/images/val2014/COCO_val2014_<id>.jpg  hard links to one JPEG (index reads headers only)
  OUT/coco.toml                             a qpert config for it

Usage: python3 tools/synth_coco.py OUT JPEG [IMAGES]   (standard library only; deterministic)
"""
import json
import os
import random
import sys

CLASSES = ("person bicycle car motorcycle airplane bus train truck boat bench bird cat dog horse sheep cow "
           "elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard kite "
           "skateboard surfboard bottle cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
           "pizza donut cake chair couch bed toilet laptop mouse remote keyboard sink refrigerator book clock "
           "vase scissors toothbrush").split()
MISSING = [413120, 201732, 463918, 132317, 35498]


def box(rng):
    x1, y1 = round(rng.uniform(0, 400), 2), round(rng.uniform(0, 300), 2)
    return [x1, y1, round(x1 + rng.uniform(5, 200), 2), round(y1 + rng.uniform(5, 150), 2)]


def image_entry(rng):
    captions = {}
    for c in range(5):
        classes = rng.sample(CLASSES, 3)
        text = f"A {classes[0]} and two {classes[1]}s near a {rng.choice(CLASSES)} number {c} {rng.random():.6f}"
        dets = {k: [[rng.randrange(100), box(rng)] for _ in range(rng.randint(1, 3))] for k in classes}
        captions[text] = {
            "detections": dets,
            "noun_chunks": [[f"a {k}", k] for k in classes],
            "det_sequences": [[k, k, "_"] for k in classes] + [["_"] * 3] * 6,
            "split": "train",
        }
    return captions


def main():
    out, jpeg = sys.argv[1], sys.argv[2]
    n_images = int(sys.argv[3]) if len(sys.argv) > 3 else 120_000
    rng = random.Random(0)
    ids = rng.sample(range(1, 600_000), n_images)
    ids = [i for i in ids if i not in MISSING]
    test = ids[:4_995] + MISSING
    os.makedirs(f"{out}/annotations", exist_ok=True)
    os.makedirs(f"{out}/images/val2014", exist_ok=True)
    with open(f"{out}/coco_entities_release.json", "w") as f:
        f.write("{")
        for n, i in enumerate(ids):
            f.write(("," if n else "") + json.dumps(str(i)) + ": " + json.dumps(image_entry(rng)))
        f.write("}")
    split = []
    for n, i in enumerate(test):
        name = f"COCO_val2014_{i:012d}.jpg"
        captions = [f"caption {c} of image {i}." for c in range(5 + (1 if n < 10 else 0))]
        split.append({"image": f"val2014/{name}", "caption": captions})
        path = f"{out}/images/val2014/{name}"
        if not os.path.exists(path):
            os.link(jpeg, path)
    with open(f"{out}/annotations/coco_karpathy_test.json", "w") as f:
        json.dump(split, f)
    with open(f"{out}/coco.toml", "w") as f:
        f.write(f"""[dataset]
name = "coco-synthetic"
annotations = "{out}/annotations/coco_karpathy_test.json"
images = "{out}/images"
entities = "{out}/coco_entities_release.json"
box_origin = 0

[model]
dir = "{out}/model"
device = "cpu"
precision = "f32"

[qpert]
enabled = true
alpha = 8.0
npc = 0.99
weight = "constant"
projector = "official"

[rerank]
enabled = true
k = 128

[output]
dir = "{out}/cache"
""")


if __name__ == "__main__":
    main()
