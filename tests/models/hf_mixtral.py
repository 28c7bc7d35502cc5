"""A small Hugging Face Mixtral (transformers' MixtralForCausalLM) built from its config, no
downloads: 2 layers, width 64, 4 heads of which 2 key/value heads (grouped-query attention), 4
experts of which each token takes 2, vocabulary 256.

What it exercises: rotary embeddings and RMSNorm, and transformers' mixture-of-experts layer,
which sorts tokens by expert, counts them with `torch.histc` (on float input on the CPU, on int
input elsewhere: the trace must take the CPU path) and runs the experts through transformers'
own grouped matmul op.

Inputs: "input_ids", token ids, a LongTensor [B, 16] in [0, 256). Output: {"logits": [B, 16,
256]}. Loss: next-token cross-entropy, `target` is the ids shifted by one, [B, 16].
"""

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

VOCAB = 256
LENGTH = 16


def build_model():
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
        use_cache=False,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def example_inputs(batch_size):
    return {"input_ids": torch.randint(0, VOCAB, (batch_size, LENGTH))}


def loss_fn(output, target):
    logits = output["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
