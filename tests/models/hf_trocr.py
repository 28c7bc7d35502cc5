"""A small Hugging Face TrOCR decoder (transformers' TrOCRForCausalLM) built from its config, no
downloads: 2 layers, width 32, 2 heads, vocabulary 64, sinusoidal positions
(use_learned_position_embeddings=False, as microsoft/trocr-small-* configure it).

Its TrOCRSinusoidalPositionalEmbedding keeps the position table as a plain tensor attribute
(`self.weights`), neither a parameter nor a buffer, which the meta-device build leaves without
values: ftc registers it as a non-persistent buffer when it builds the model. No dropout, so that
the pipeline trains exactly as mode single does.

Inputs: "input_ids", token ids, a LongTensor [B, 12] in [0, 64). Output: {"logits": [B, 12, 64]}.
Loss: cross-entropy against `target` ids [B, 12].
"""

import torch
import torch.nn.functional as F
from transformers import TrOCRConfig, TrOCRForCausalLM

VOCAB = 64
LENGTH = 12


def build_model():
    config = TrOCRConfig(
        vocab_size=VOCAB, d_model=32, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=64,
        max_position_embeddings=64, use_learned_position_embeddings=False, use_cache=False,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    return TrOCRForCausalLM(config)


def example_inputs(batch_size):
    return {"input_ids": torch.randint(0, VOCAB, (batch_size, LENGTH))}


def example_targets(batch_size):
    return torch.randint(0, VOCAB, (batch_size, LENGTH))


def loss_fn(output, target):
    logits = output["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
