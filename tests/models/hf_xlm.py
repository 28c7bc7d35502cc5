"""A small Hugging Face XLM (transformers' XLMForMultipleChoice) built from its config, no
downloads: 2 layers, width 32, 4 heads, vocabulary 128, 3 language embeddings, no dropout.

XLMModel.forward checks its input with `assert lengths.max().item() <= slen`, the lengths
counted from the token ids: torch.export records it as `item`, `le` and `_assert_scalar`. Inputs:
"input_ids" and "langs", [B, 3, 10] (3 choices of 10 tokens; ids from 4, so no padding), and
"attention_mask". Output: {"logits": [B, 3]}; loss: cross-entropy against the right choice, [B].
"""

import torch
import torch.nn.functional as F
from transformers import XLMConfig, XLMForMultipleChoice

VOCAB = 128
CHOICES = 3
LENGTH = 10


def build_model():
    config = XLMConfig(
        vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, n_langs=3, use_lang_emb=True, pad_index=2,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, summary_first_dropout=0.0,
        num_labels=1, use_cache=False,
    )  # fmt: skip
    return XLMForMultipleChoice(config)


def example_inputs(batch_size):
    return {
        "input_ids": torch.randint(4, VOCAB, (batch_size, CHOICES, LENGTH)),
        "langs": torch.randint(0, 3, (batch_size, CHOICES, LENGTH)),
        "attention_mask": torch.ones(batch_size, CHOICES, LENGTH, dtype=torch.long),
    }


def loss_fn(output, target):
    return F.cross_entropy(output["logits"], target)
