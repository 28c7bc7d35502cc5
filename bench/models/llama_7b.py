"""A Llama-2-7B-shaped model (transformers' LlamaForCausalLM: 32 blocks, width 4096, 6.7B
parameters) for compiling on the meta device: fx cannot trace transformers' control flow, so
`ftc compile` takes torch.export. Nothing is downloaded and no weight is allocated.

    /usr/bin/time -v .venv/bin/ftc compile bench/models/llama_7b.py --stages 8 --batch-size 2 -o /tmp/llama_7b
"""

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

VOCABULARY = 32000
CONTEXT = 1024


class Llama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        config = LlamaConfig(vocab_size=VOCABULARY, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                             use_cache=False)  # fmt: skip
        self.model = LlamaForCausalLM(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def build_model():
    return Llama()


def example_inputs(batch_size=2):
    return (torch.randint(0, VOCABULARY, (batch_size, CONTEXT)),)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
