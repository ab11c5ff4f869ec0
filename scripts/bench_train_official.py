#!/usr/bin/env python3
"""Decoder training steps with the official segment-anything modules, for BENCHMARKS.md (run by
scripts/bench_train.sh beside `skinsam train-bench`): the same step as SkinSAM's trainer on cached
embeddings: prompt encoder (box + point, frozen) -> mask decoder (single-mask output) -> soft Dice
+ BCE on 256x256 logits -> backward -> Adam on the mask decoder. Random embeddings, prompts and
targets of the same shapes. Prints one JSON line.
"""
import argparse
import json
import resource
import time

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import mask_decoder as md


def predict_masks_per_image(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings):
    """The official MaskDecoder.predict_masks with MedSAM's change for training: one embedding per
    prompt is used as is (the official code repeats each embedding for every prompt)."""
    output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    if image_embeddings.shape[0] != tokens.shape[0]:
        src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
    else:
        src = image_embeddings
    src = src + dense_prompt_embeddings
    pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
    b, c, h, w = src.shape
    hs, src = self.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]
    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled_embedding = self.output_upscaling(src)
    hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)], dim=1)
    b, c, h, w = upscaled_embedding.shape
    masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
    return masks, self.iou_prediction_head(iou_token_out)


md.MaskDecoder.predict_masks = predict_masks_per_image


def dice_bce(logits, target):
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return dice.mean(), torch.nn.functional.binary_cross_entropy_with_logits(logits, target)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="vit_b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    sam = sam_model_registry[args.variant]()
    for p in sam.parameters():
        p.requires_grad_(False)
    for p in sam.mask_decoder.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(sam.mask_decoder.parameters(), lr=1e-5)
    b = args.batch
    c = sam.prompt_encoder.embed_dim
    e = sam.prompt_encoder.image_embedding_size[0]
    feats = torch.randn(b, c, e, e)
    points = (torch.rand(b, 1, 2) * 1024, torch.ones(b, 1, dtype=torch.int64))
    boxes = torch.tensor([[200.0, 200.0, 800.0, 800.0]]).repeat(b, 1)
    target = (torch.rand(b, 1, 256, 256) > 0.5).float()

    parts = [0.0, 0.0, 0.0]

    def step():
        t0 = time.perf_counter()
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low, _ = sam.mask_decoder(
            image_embeddings=feats,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        d, bce = dice_bce(low, target)
        loss = d + bce
        value = loss.item()
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        parts[0] += t1 - t0
        parts[1] += t2 - t1
        parts[2] += t3 - t2
        return value

    for _ in range(2):
        step()
    parts[:] = [0.0, 0.0, 0.0]
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    s = time.perf_counter() - t
    print(json.dumps({
        "impl": "official",
        "variant": args.variant,
        "batch": b,
        "threads": torch.get_num_threads(),
        "steps_per_s": args.steps / s,
        "ms_per_step": 1e3 * s / args.steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "forward_ms": 1e3 * parts[0] / args.steps,
        "backward_ms": 1e3 * parts[1] / args.steps,
        "update_ms": 1e3 * parts[2] / args.steps,
    }))


if __name__ == "__main__":
    main()
