"""A small Hugging Face Encodec (transformers' EncodecModel) built from its config, no downloads:
4 filters, hidden size 16, downsampling by 2 and 4, one LSTM layer, 2 quantizers of 32 codes.

Its EncodecConv1d layers pad by 0-d int64 buffers (`stride`, `kernel_size`, `padding_total`),
which a trace on the meta device sees without values.

Inputs: "input_values", audio [B, 1, 320]. Outputs: {"audio_codes": [1, B, 2, 40] (int64),
"audio_values": [B, 1, 320]}. Loss: mean squared error of audio_values against `target`.
"""

import torch
import torch.nn.functional as F
from transformers import EncodecConfig, EncodecModel

LENGTH = 320


def build_model():
    config = EncodecConfig(
        hidden_size=16, num_filters=4, upsampling_ratios=[2, 4], num_lstm_layers=1,
        codebook_size=32, target_bandwidths=[12.0], sampling_rate=8000,
    )  # fmt: skip
    return EncodecModel(config)


def example_inputs(batch_size):
    return {"input_values": torch.randn(batch_size, 1, LENGTH)}


def example_targets(batch_size):
    return torch.randn(batch_size, 1, LENGTH)


def loss_fn(output, target):
    return F.mse_loss(output["audio_values"], target)
