"""A small Hugging Face GPT-2 (transformers' GPT2LMHeadModel) built from its config, no
downloads: 2 layers, width 64, 4 heads, vocabulary 512, context 64.

torch.fx cannot trace transformers 5 models, so `ftc compile` (frontend auto) falls back to
torch.export. What it exercises: the HF Conv1D layers (addmm on a flattened view), the causal
mask built from the input's shape, scaled-dot-product attention, dropout (p = 0.1, so the check
must replay the random state per stage), the LM head tied to the token embedding, and a
ModelOutput (a dict) as the output.

Inputs: "input_ids", token ids, a LongTensor [B, 16] in [0, 512). Output: {"logits": [B, 16,
512]}. Loss: next-token cross-entropy, `target` is the ids shifted by one, [B, 16].
"""

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 512
LENGTH = 16


def build_model():
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def example_inputs(batch_size):
    return {"input_ids": torch.randint(0, VOCAB, (batch_size, LENGTH))}


def loss_fn(output, target):
    logits = output["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
