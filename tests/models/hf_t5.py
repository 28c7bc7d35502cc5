"""A small Hugging Face T5 (transformers' T5ForConditionalGeneration) built from its config, no
downloads: 2 encoder and 2 decoder layers, width 64, 4 heads, vocabulary 512.

torch.fx cannot trace transformers 5 models, so `ftc compile` (frontend auto) falls back to
torch.export. What it exercises: an encoder-decoder (the encoder's output feeds every decoder
layer's cross-attention, so it crosses many stages), relative position buckets computed from
the sequence lengths, RMS-style T5 layer norms, attention dropout inside
scaled_dot_product_attention and dropout modules (p = 0.1), and a dict output of two tensors.

Inputs: "input_ids" [B, 16] and "decoder_input_ids" [B, 8], token ids in [0, 512). Output:
{"logits": [B, 8, 512], "encoder_last_hidden_state": [B, 16, 64]}. Loss: cross-entropy of the
logits against `target`, the decoder's next tokens, [B, 8].
"""

import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

VOCAB = 512
SOURCE_LENGTH = 16
TARGET_LENGTH = 8


def build_model():
    config = T5Config(
        num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128,
        vocab_size=VOCAB, use_cache=False,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def example_inputs(batch_size):
    return {
        "input_ids": torch.randint(0, VOCAB, (batch_size, SOURCE_LENGTH)),
        "decoder_input_ids": torch.randint(0, VOCAB, (batch_size, TARGET_LENGTH)),
    }


def loss_fn(output, target):
    logits = output["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
