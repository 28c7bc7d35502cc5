"""An encoder layer that repairs its output while training where a value overflowed, as
transformers' DETR family does (DetrEncoderLayer), and one that checks with isinf instead."""

import torch
import torch.nn as nn


class GuardedLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, hidden_states):
        hidden_states = self.fc(hidden_states)
        if self.training:
            if not torch.isfinite(hidden_states).all():
                clamp_value = torch.finfo(hidden_states.dtype).max - 1000
                hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class InfGuardedLayer(GuardedLayer):
    def forward(self, hidden_states):
        hidden_states = self.fc(hidden_states)
        if torch.isinf(hidden_states).any():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class AssertedLayer(GuardedLayer):
    """Asserts while training that its output's range holds no NaN, as transformers' I-BERT
    (QuantAct) does."""

    def forward(self, hidden_states):
        hidden_states = self.fc(hidden_states)
        if self.training:
            x_min, x_max = hidden_states.min(), hidden_states.max()
            assert x_max.isnan().sum() == 0 and x_min.isnan().sum() == 0
        return hidden_states
