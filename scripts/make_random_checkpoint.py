#!/usr/bin/env python3
"""Saves a randomly initialised SAM built from the official modules (torch.manual_seed(SEED),
default 0) as a torch.save'd state_dict, atomically. The benchmarks load it on both sides; the
skinsam_tiny training run starts from it. Usage: VARIANT PATH [SEED]"""
import os
import sys
from functools import partial

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


def build_skinsam_tiny():
    """The `skinsam_tiny` variant of src/model/variant.rs (256-px input, ViT 192-d, depth 6,
    3 heads, global attention everywhere; vit_b's prompt encoder and decoder, decoder MLP 1024),
    with the official modules' default initialisation."""
    img, patch, dim = 256, 16, 256
    grid = img // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=6, embed_dim=192, img_size=img, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=3, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=[0, 1, 2, 3, 4, 5], window_size=14,
            out_chans=dim),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(img, img), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=1024, num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def main():
    variant, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    sam = build_skinsam_tiny() if variant == "skinsam_tiny" else sam_model_registry[variant]()
    torch.save(sam.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
