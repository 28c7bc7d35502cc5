"""A small Hugging Face BERT (transformers' BertForMaskedLM) built from its config, no
downloads: 2 layers, width 64, 4 heads, vocabulary 512.

torch.fx cannot trace transformers 5 models, so `ftc compile` (frontend auto) falls back to
torch.export. What it exercises: keyword inputs (ids and an attention mask whose padding is
turned into an additive mask), token-type and position embeddings read from buffers, post-norm
residual blocks, dropout (p = 0.1), and the MLM head tied to the word embedding.

Inputs: "input_ids" [B, 16] in [0, 512) and "attention_mask" [B, 16] of 1 (token) and 0 (padding,
the last 4 positions). Output: {"logits": [B, 16, 512]}. Loss: masked-LM cross-entropy; `target`
holds the original ids at masked positions and -100 elsewhere, [B, 16].
"""

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

VOCAB = 512
LENGTH = 16
PADDING = 4


def build_model():
    config = BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return BertForMaskedLM(config)


def example_inputs(batch_size):
    mask = torch.ones(batch_size, LENGTH, dtype=torch.long)
    mask[:, LENGTH - PADDING :] = 0
    return {"input_ids": torch.randint(0, VOCAB, (batch_size, LENGTH)), "attention_mask": mask}


def loss_fn(output, target):
    logits = output["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
