"""A synthetic click log for examples/two_tower.py, and an example of a "module" data set.

Each token id has a hidden taste vector; a query's taste is the mean over its (non-padding)
tokens, and an item is clicked when its features point the same way as the query's taste. The
model has to learn both towers to predict that. Plug it in with

    "data": {"name": "module", "module": "two_tower_clicks.py:clicks", "size": 8192}

(the other "data" keys are passed to clicks() as keyword arguments).
"""

import torch

from ftc.runtime.data import TensorDataset

VOCAB = 1000
QUERY_LENGTH = 16
ITEM_FEATURES = 32


def clicks(size: int = 4096, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randint(1, VOCAB, (size, QUERY_LENGTH), generator=generator)
    lengths = torch.randint(2, QUERY_LENGTH + 1, (size, 1), generator=generator)
    query[torch.arange(QUERY_LENGTH) >= lengths] = 0  # padding after each query's length
    item = torch.randn(size, ITEM_FEATURES, generator=generator)
    taste = torch.randn(VOCAB, ITEM_FEATURES, generator=generator)
    taste[0] = 0.0
    query_taste = taste[query].sum(1) / lengths
    clicked = ((query_taste * item).sum(-1) > 0).float()
    return TensorDataset({"query": query, "item": item}, clicked)
