"""A small Hugging Face Mimi (transformers' MimiModel) built from its config, no downloads: 4
filters, hidden size 16, downsampling by 2 and 4, one transformer layer, 2 quantizers (one
semantic) of 32 codes.

Its convolutions pad by 0-d int64 buffers, as Encodec's do, and its MimiEuclideanCodebook caches
`self._embed`, computed from its buffers, on its first call.

Inputs: "input_values", audio [B, 1, 320]. Outputs: {"audio_codes": [B, 2, 20] (int64),
"audio_values": [B, 1, 320]}. Loss: mean squared error of audio_values against `target`.
"""

import torch
import torch.nn.functional as F
from transformers import MimiConfig, MimiModel

LENGTH = 320


def build_model():
    config = MimiConfig(
        hidden_size=16, num_filters=4, upsampling_ratios=[2, 4], codebook_size=32, codebook_dim=16,
        num_quantizers=2, num_semantic_quantizers=1, vector_quantization_hidden_dimension=16,
        upsample_groups=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, sampling_rate=8000,
    )  # fmt: skip
    return MimiModel(config)


def example_inputs(batch_size):
    return {"input_values": torch.randn(batch_size, 1, LENGTH)}


def example_targets(batch_size):
    return torch.randn(batch_size, 1, LENGTH)


def loss_fn(output, target):
    return F.mse_loss(output["audio_values"], target)
