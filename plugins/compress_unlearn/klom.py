"""KLOM, "KL divergence of margins" (Georgiev et al. 2024, arXiv 2410.23232): how far the outputs of
unlearned models are from those of oracles retrained without the forget set, per example.

For one example, the margins (:func:`compress_unlearn.trak.margins`) of N unlearned models and of
N' oracles are two samples of a distribution over training randomness. Both are clipped to
±``clip``, binned into ``bins`` equal bins spanning both samples, and KLOM = KL(unlearned ‖ oracle)
of the bin frequencies, the oracle's frequency raised to ``eps`` in bins the unlearned sample
occupies and both renormalized (``scipy.stats.entropy``), as the reference code does
(``RoyRin/data-unlearning-bench``, ``unlearning_bench/eval.py``: ``compute_binned_KL_div``,
defaults 20 bins, eps 1e-5, clip 100). One difference: the reference bins with ``np.digitize``,
which drops the samples equal to the largest value (they fall past the last bin); here the last
bin is closed, as ``np.histogram`` does, so every sample counts.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from compress.api import MetricInputs, MetricParams, ModelMetric, collate, onloaded
from compress_unlearn.metrics import check_checkpoint
from compress_unlearn.trak import margins, output_logits


def klom(unlearned: Tensor, oracle: Tensor, bins: int = 20, eps: float = 1e-5, clip: float = 100.0) -> Tensor:
    """Per-example KLOM in nats: ``unlearned`` ``[N, n]`` and ``oracle`` ``[N', n]`` margins → ``[n]``."""
    unlearned, oracle = unlearned.double().clamp(-clip, clip), oracle.double().clamp(-clip, clip)
    low = torch.minimum(unlearned.min(0).values, oracle.min(0).values)
    high = torch.maximum(unlearned.max(0).values, oracle.max(0).values)
    width = torch.where(high > low, high - low, torch.ones_like(high)) / bins

    def frequencies(samples: Tensor) -> Tensor:
        index = ((samples - low) / width).floor().long().clamp(0, bins - 1)
        counts = torch.zeros(bins, samples.shape[1], dtype=torch.float64).scatter_add_(
            0, index, torch.ones_like(samples)
        )
        return counts / samples.shape[0]

    p, q = frequencies(unlearned), frequencies(oracle)
    q = torch.where(p > 0, q.clamp_min(eps), q)
    q = q / q.sum(0)
    terms = torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p))
    return terms.sum(0)


@torch.no_grad()
def model_margins(model: nn.Module, samples: list, device: torch.device, batch_size: int) -> Tensor:
    """The margins ``[n]`` of an image classifier on image samples (``pixel_values``, ``labels``)."""
    values = []
    for start in range(0, len(samples), batch_size):
        batch = collate(samples[start : start + batch_size], 0)
        pixels, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
        values.append(margins(output_logits(model(pixel_values=pixels)), labels).cpu())
    return torch.cat(values)


class KLOMParams(MetricParams):
    oracles: list[str] = Field(
        min_length=1, description="directories of oracle models, retrained without the forget set (different seeds)"
    )
    unlearned: list[str] = Field(
        [],
        description="directories of more unlearned models (other seeds), sampled together with the run's model",
    )
    bins: int = Field(20, ge=2, description="bins of the margin histograms (the reference's 20)")
    clip: float = Field(100.0, gt=0, description="margins are clipped to ±clip (the reference's 100)")
    batch_size: int = Field(256, gt=0, description="images per forward pass")


class KLOM(ModelMetric):
    """KLOM against retrained oracles (DMM's metric), averaged over the entry's images: the KL of the
    per-example margin distribution of the unlearned models (the run's model and ``unlearned``)
    from that of ``oracles``; 0 = indistinguishable from retraining. Also ``p95``, the 95th
    percentile over the examples (the tail that averages hide)."""

    name = "klom"
    tasks: ClassVar[frozenset[str]] = frozenset({"image-classification"})
    by_default: ClassVar[bool] = False
    Params = KLOMParams
    params: KLOMParams

    def check(self, spec: Any, data: Any, config: Any) -> None:
        for index, path in enumerate([*self.params.oracles, *self.params.unlearned]):
            check_checkpoint(path, "oracles" if index < len(self.params.oracles) else "unlearned")

    def measure(self, original: nn.Module, compressed: nn.Module, inputs: MetricInputs) -> dict[str, float]:
        from transformers import AutoModelForImageClassification

        def sample(models: list) -> Tensor:
            rows = []
            for model in models:
                model = AutoModelForImageClassification.from_pretrained(model) if isinstance(model, str) else model
                with onloaded(model, inputs.device):
                    rows.append(model_margins(model.eval(), inputs.samples, inputs.device, self.params.batch_size))
            return torch.stack(rows)

        values = klom(
            sample([compressed, *self.params.unlearned]),
            sample(self.params.oracles),
            self.params.bins,
            clip=self.params.clip,
        )
        return {"compressed": values.mean().item(), "p95": values.quantile(0.95).item()}
