"""kontext-tiny: an architecture-identical, randomly initialised miniature of FLUX.1 Kontext.

Built in-process from a fixed seed, so it needs no download and is the same on every machine. It keeps
the real geometry (VAE downsampling by 8, 16 latent channels, 2x2 patches packed into 64-dim tokens,
text tokens prepended, context tokens appended with RoPE axis 0 = 1, 512 T5 tokens, 77 CLIP tokens)
and is only narrower and shallower. Tokenizers are byte-level BPE models built with the `tokenizers`
library, so every prompt maps to distinct tokens. Its pictures are abstract.
"""

from __future__ import annotations

from typing import Any

SEED = 20250626  # fixed: the same weights everywhere
DEFAULT_STEPS = 4

# Init gains on top of PyTorch's default init: with plain default init the random transformer
# barely reacts to the prompt or the context image. Sharper attention and stronger text embedders
# make prompt, seed and input image all visibly change the picture. Still random, still seeded.
_GAINS = {
    ("to_q.", "to_k.", "add_q_proj", "add_k_proj"): 3.0,
    ("context_embedder", "text_embedder"): 4.0,
    ("proj_out",): 3.0,
}


def _byte_level_tokenizer(specials: list[str], template: str, max_length: int, **tokens: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **tokens)


def build_tiny_pipeline() -> Any:
    """A FluxKontextPipeline with tiny random weights, identical on every call."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    # CLIP side: EOS gets the highest id, which CLIP pools at; 77 tokens as the real model.
    clip_tok = _byte_level_tokenizer(
        ["<|pad|>", "<|startoftext|>", "<|endoftext|>"],
        "<|startoftext|> $A <|endoftext|>",
        77,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    t5_tok = _byte_level_tokenizer(
        ["<pad>", "</s>", "<unk>"],
        "$A </s>",
        512,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
                decoder_start_token_id=t5_tok.pad_token_id,
            )
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
            sample_size=1024,
        )
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            for keys, gain in _GAINS.items():
                if name.endswith("weight") and any(k in name for k in keys):
                    param.mul_(gain)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    for module in (clip, t5, transformer, vae):
        module.eval()  # freshly built modules start in training mode (dropout on)
    return FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
