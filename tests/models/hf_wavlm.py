"""A small Hugging Face WavLM (transformers' WavLMForSequenceClassification) built from its
config, no downloads: 2 layers, width 16, a two-layer convolutional feature encoder.

Its attention calls torch's F.multi_head_attention_forward with `training=self.training`, which
only zeroes the attention dropout (p = 0.1 here) in eval mode; its relative position bias is
gated by the hidden states. Inputs: "input_values", a waveform [B, 400]. Output: {"logits":
[B, 3]}; loss: cross-entropy against a class id, [B].
"""

import torch
import torch.nn.functional as F
from transformers import WavLMConfig, WavLMForSequenceClassification

CLASSES = 3


def build_model():
    config = WavLMConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        num_buckets=16, max_bucket_distance=32, layerdrop=0.0, mask_time_prob=0.0, num_labels=CLASSES,
        classifier_proj_size=8,
    )  # fmt: skip
    return WavLMForSequenceClassification(config)


def example_inputs(batch_size):
    return {"input_values": torch.randn(batch_size, 400)}


def example_targets(batch_size):
    return torch.randint(0, CLASSES, (batch_size,))


def loss_fn(output, target):
    return F.cross_entropy(output["logits"], target)
