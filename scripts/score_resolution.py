"""Does the scoring resolution (or the threshold) change the default model's Dice?

Runs the official segment-anything modules with the shipped weights (models/skinsam_tiny.safetensors)
on the validation images of reports/skinsam-tiny/box_point/results.csv, with the same box + point
prompts that report used, and prints the mean Dice scored five ways: at the image's size (200x150,
the ground truth resized with nearest-neighbour: what the reports do; also the report's own
figure, read from the CSV), at the mask's size (600x450, the low-res logits upsampled to it), and
with the logits thresholded at -1 and +1 instead of 0 at both sizes.
Usage: .venv/bin/python scripts/score_resolution.py [N_IMAGES]   (about 6 minutes for all 836)
"""
import sys, csv, numpy as np, torch
sys.path.insert(0, "scripts")
from sam_builders import build
from safetensors.torch import load_file
from segment_anything import SamPredictor
from PIL import Image
torch.set_num_threads(2)
sam = build("skinsam_tiny")
sd = {k: v.float() for k, v in load_file("models/skinsam_tiny.safetensors").items()}
sam.load_state_dict(sd, strict=True); sam.eval()
pred = SamPredictor(sam)
D = "../shared/data/ham10000"
rows = [r for r in csv.DictReader(open("reports/skinsam-tiny/box_point/results.csv")) if r["model"] == "skinsam-tiny"]
N = int(sys.argv[1]) if len(sys.argv) > 1 else len(rows)
def dice(p, g):
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else 2.0 * (p & g).sum() / s
res = {k: [] for k in ["img", "img_csv", "mask", "mask_t-1", "mask_t+1", "img_t-1", "img_t+1"]}
for r in rows[:N]:
    img = np.array(Image.open(f"{D}/images/{r['id']}.jpg").convert("RGB"))
    gt_full = np.array(Image.open(f"{D}/masks/{r['id']}_segmentation.png").convert("L")) >= 128
    h, w = img.shape[:2]; H, W = gt_full.shape
    ys = (np.floor((np.arange(h) + 0.5) * H / h)).astype(int).clip(0, H - 1)  # nearest (pixel centres)
    xs = (np.floor((np.arange(w) + 0.5) * W / w)).astype(int).clip(0, W - 1)
    gt_small = gt_full[ys][:, xs]
    pred.set_image(img)
    box = np.array([float(r[k]) for k in ["box_x0", "box_y0", "box_x1", "box_y1"]])
    pt = np.array([[float(r["point_x"]), float(r["point_y"])]])
    with torch.no_grad():
        logits, _, low = pred.predict(point_coords=pt, point_labels=np.array([1]), box=box, multimask_output=False, return_logits=True)
        big = sam.postprocess_masks(torch.from_numpy(low)[None], pred.input_size, (H, W))[0, 0].numpy()
    small = logits[0]
    res["img"].append(dice(small > 0, gt_small)); res["img_csv"].append(float(r["dice"]))
    res["mask"].append(dice(big > 0, gt_full))
    for t in (-1, 1):
        res[f"mask_t{t:+d}"].append(dice(big > t, gt_full)); res[f"img_t{t:+d}"].append(dice(small > t, gt_small))
for k, v in res.items():
    print(k, round(float(np.mean(v)), 4), len(v))
