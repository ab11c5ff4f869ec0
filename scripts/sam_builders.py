"""The SAM variants of src/model/variant.rs built from the official segment-anything modules, in
one place for the scripts that need them (golden outputs, random checkpoints, benchmarks): the
official vit_b / vit_l / vit_h through `sam_model_registry`, and this project's `tiny` (tests)
and `skinsam_tiny` (the default model) with the same modules and the official initialisation."""
from functools import partial

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

VARIANTS = ["tiny", "skinsam_tiny", "vit_b", "vit_l", "vit_h"]
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def _sam(*, img_size, embed_dim, depth, num_heads, global_attn_indexes, prompt_dim, decoder_mlp_dim, iou_hidden_dim,
         decoder_heads):
    """SAM's build_sam structure with every size a parameter (the official `_build_sam` fixes the
    prompt and decoder widths at 256)."""
    patch = 16
    grid = img_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn_indexes, window_size=14,
            out_chans=prompt_dim),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
            mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=decoder_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden_dim),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )


def build_tiny():
    """`tiny`: vit_b's structure (1024-px input, windows and one global block) with narrow layers."""
    return _sam(img_size=1024, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=[1], prompt_dim=32,
                decoder_mlp_dim=64, iou_hidden_dim=32, decoder_heads=4)


def build_skinsam_tiny():
    """`skinsam_tiny` (MODEL_CARD.md): 256-px input, ViT 192-d, depth 6, 3 heads, global attention
    everywhere; vit_b's prompt encoder and decoder widths, decoder MLP 1024."""
    return _sam(img_size=256, embed_dim=192, depth=6, num_heads=3, global_attn_indexes=[0, 1, 2, 3, 4, 5],
                prompt_dim=256, decoder_mlp_dim=1024, iou_hidden_dim=256, decoder_heads=8)


def build(variant, checkpoint=None):
    """A variant with the official default initialisation (under the caller's torch seed), or
    with `checkpoint` (a torch.save'd state_dict) loaded strictly."""
    if variant == "tiny":
        sam = build_tiny()
    elif variant == "skinsam_tiny":
        sam = build_skinsam_tiny()
    else:
        return sam_model_registry[variant](checkpoint=checkpoint)
    if checkpoint:
        sam.load_state_dict(torch.load(checkpoint), strict=True)
    return sam
