"""The Conditional Quantization-Aware Accuracy Predictor (CQAP).

From EQ-Net's ``search/accuracy_predictor``: a sub-network is encoded as a 6-slot condition
(per-channel / per-tensor, weights symmetric / asymmetric, inputs symmetric / asymmetric)
followed by one-hot weight bits and one-hot input bits of every layer but the first and the
last (``OQAEncoder``); an MLP of ``depth`` ReLU layers of width ``width`` (the code: 7 × 200)
and a bias-free output adds its prediction to the training targets' mean (``base_acc``). It
trains with SmoothL1 on accuracies in [0, 1] with Adam (lr 4e-4, weight decay 1e-5, the
config's; the paper says SGD) on 80 % of the measured sub-networks, and is judged by
Kendall's τ on the other 20 %.

Fixed from the code: its encoder never sets the asymmetric slots (``feature[3] = 0``,
``feature[5] = 0``), so asymmetric conditions were told apart only by a missing 1; here each
condition sets its own slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress_eqnet.supernet import Space, Subnet


class Encoder:
    """Sub-networks of one supernet as feature vectors."""

    def __init__(self, space: Space, layers: int) -> None:
        self.w_bits, self.a_bits = list(space.w_bits), list(space.a_bits)
        self.middle = layers - 2
        self.width = 6 + self.middle * (len(self.w_bits) + len(self.a_bits))

    def indices(self, subnet: Subnet) -> list[int]:
        """The positions of the ones in ``subnet``'s feature vector."""
        ones = [0 if subnet.channel[1] else 1, 2 if subnet.w_symmetric[1] else 3, 4 if subnet.a_symmetric[1] else 5]
        stride = len(self.w_bits) + len(self.a_bits)
        for i in range(self.middle):
            start = 6 + i * stride
            ones.append(start + self.w_bits.index(subnet.w_bits[i + 1]))
            ones.append(start + len(self.w_bits) + self.a_bits.index(subnet.a_bits[i + 1]))
        return ones

    def encode(self, subnet: Subnet) -> torch.Tensor:
        """The feature vector of ``subnet``; its condition is its second layer's (searches use one condition)."""
        return self.encode_all([subnet])[0]

    def encode_all(self, subnets: list[Subnet]) -> torch.Tensor:
        features = torch.zeros(len(subnets), self.width)
        rows = [row for row, subnet in enumerate(subnets) for _ in range(3 + 2 * self.middle)]
        features[rows, [i for subnet in subnets for i in self.indices(subnet)]] = 1
        return features


class AccuracyPredictor(nn.Module):
    """The code's ``AccuracyPredictor``: MLP plus a fixed offset (the mean training accuracy)."""

    def __init__(self, features: int, width: int = 200, depth: int = 7) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(features if i == 0 else width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 1, bias=False))
        self.layers = nn.Sequential(*layers)
        self.register_buffer("base", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1) + self.base


@dataclass
class PredictorFit:
    """A trained predictor and how well it ranks held-out sub-networks."""

    predictor: AccuracyPredictor
    kendall_tau: float
    rmse: float
    """Root mean squared error on the held-out fifth, in accuracy points (%)."""
    train_size: int
    test_size: int

    def report(self) -> dict[str, Any]:
        return {
            "kendall_tau": self.kendall_tau,
            "rmse_points": self.rmse,
            "train_subnets": self.train_size,
            "test_subnets": self.test_size,
        }


def fit_predictor(
    features: torch.Tensor,
    accuracies: torch.Tensor,
    epochs: int,
    seed: int,
    width: int = 200,
    depth: int = 7,
    batch_size: int = 256,
) -> PredictorFit:
    """Train on a random 80 % of ``(features, accuracies in [0, 1])``, measure τ on the rest (the
    code's ``build_acc_data_loader`` split and ``AccPredictorTrainer``; the last epoch's model)."""
    from scipy.stats import kendalltau

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(features), generator=generator)
    features, accuracies = features[order].float(), accuracies[order].float()
    cut = len(features) // 5 * 4
    torch.manual_seed(seed)
    predictor = AccuracyPredictor(features.shape[1], width, depth)
    predictor.base.fill_(accuracies[:cut].mean())
    optimizer = torch.optim.Adam(predictor.parameters(), lr=4e-4, weight_decay=1e-5)
    loss_fn = nn.SmoothL1Loss()
    for _ in range(epochs):
        shuffle = torch.randperm(cut, generator=generator)
        for start in range(0, cut, batch_size):
            index = shuffle[start : start + batch_size]
            optimizer.zero_grad()
            loss_fn(predictor(features[index]), accuracies[index]).backward()
            optimizer.step()
    predictor.eval()
    with torch.no_grad():
        predicted = predictor(features[cut:])
    truth = accuracies[cut:]
    tau = float(kendalltau(predicted.numpy(), truth.numpy())[0]) if len(truth) > 1 else float("nan")
    rmse = float(((predicted - truth) ** 2).mean().sqrt() * 100)
    return PredictorFit(predictor, tau, rmse, cut, len(truth))
