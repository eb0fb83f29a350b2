"""Independent PyTorch references for the disagreement scores (MC dropout, head ensemble)."""

from __future__ import annotations

import numpy as np


def _mutual_information(probabilities) -> np.ndarray:
    """BALD's mutual information of stacked per-sample probabilities (samples, n, classes)."""
    import torch

    p = torch.stack(probabilities).numpy()
    entropy = lambda q: -(q * np.log(np.clip(q, 1e-30, None))).sum(-1)  # noqa: E731
    return entropy(p.mean(0)) - entropy(p).mean(0)


def thinned_head_mutual_information(embeddings, weight, bias, kept, rate) -> np.ndarray:
    """Reference MC dropout: each mask's thinned torch Linear, then the mutual information."""
    import torch

    probabilities = []
    for mask in torch.from_numpy(kept):
        head = torch.nn.Linear(weight.shape[1], weight.shape[0]).double()
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight).double() * mask / (1 - rate))
            head.bias.copy_(torch.from_numpy(bias).double())
            probabilities.append(torch.softmax(head(torch.from_numpy(embeddings).double()), -1))
    return _mutual_information(probabilities)


def ensemble_mutual_information(embeddings, members) -> np.ndarray:
    """Reference head ensemble: each member as torch layers, then the mutual information."""
    import torch

    probabilities = []
    for m in members:
        head = torch.nn.Sequential(
            torch.nn.Linear(*m.hidden_weight.shape[::-1]),
            torch.nn.ReLU(),
            torch.nn.Linear(*m.weight.shape[::-1]),
        ).double()
        with torch.no_grad():
            for layer, w, b in (
                (head[0], m.hidden_weight, m.hidden_bias),
                (head[2], m.weight, m.bias),
            ):
                layer.weight.copy_(torch.from_numpy(w).double())
                layer.bias.copy_(torch.from_numpy(b).double())
            probabilities.append(torch.softmax(head(torch.from_numpy(embeddings).double()), -1))
    return _mutual_information(probabilities)


def assert_scored_like(result, mutual: np.ndarray, source) -> None:
    """A map's uncertainty and unknown flags are ``mutual`` read on ``source``'s calibration.

    Uncertainty is the share of held-out windows scoring lower (tied quantiles count from
    the first of them); windows at the threshold itself (float32 against float64) may go
    either way.
    """
    reference = source.reference
    levels = np.linspace(0, 1, len(reference))[np.searchsorted(reference, reference)]
    np.testing.assert_allclose(
        result.uncertainty.ravel(), np.interp(mutual, reference, levels), atol=1e-4
    )
    clear = ~np.isclose(mutual, source.threshold, rtol=1e-4, atol=1e-9)
    assert np.array_equal(result.unknown.ravel()[clear], (mutual > source.threshold)[clear])
