"""TRAK (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale", arXiv 2303.14186), small and
faithful, as the datamodel that DMM's predictions come from.

For an ensemble of checkpoints θ_1..θ_M trained on the same training set, each training example
``i`` gets a feature φ_m(i) = Pᵀ ∇_θ f(z_i; θ_m), the gradient of its margin
f = log p_y / (1 − p_y) = logit_y − logsumexp_{c≠y} logit_c projected by a random Gaussian
matrix P (``projection_dim`` columns), and a weight Q_i = 1 − p_y(z_i). The attribution of
training example ``i`` to an output g of input x is

    τ_i(x) = [ (1/M) Σ_m φ_m^g(x)ᵀ (Φ_mᵀΦ_m + λI)⁻¹ φ_m(i) ] · Q̄_i,   Q̄_i the mean of Q_i over checkpoints,

as the reference library computes it (``traker`` 0.3.2, ``TRAKer.finalize_scores``: the score
matrices averaged over checkpoints, times the averaged out-to-loss term; ``lambda_reg`` 0 by
default). Removing a set F changes g(x) by about −Σ_{i∈F} τ_i(x). Its soft-thresholding step
(``sparsify``) is not used, as DMM's predictions use the dense scores.

What differs from the library, and why:

- The target side: the library scores one output function (the margin) per target. DMM needs the
  change of every logit (the reference code's β has a class axis), so g is each logit, and the
  sum over F is folded into the training side first: with u_m = (Φ_mᵀΦ_m + λI)⁻¹ Σ_{i∈F} φ_m(i) Q̄_i,
  the predicted change of all logits of x is (1/M) Σ_m J_m(x) P u_m, one Jacobian-vector product
  (``torch.func.jvp``) per checkpoint along the parameter-space direction P u_m, instead of
  per-class gradients of every target.
- The projection: P has N(0, 1) entries generated in row chunks from a seed on the device when
  needed (the library's ``BasicProjector`` also generates it in blocks; its CUDA projector is a
  compiled extension). The scale of P cancels in τ. When the model has no more parameters than
  ``projection_dim``, the gradients are used unprojected (P = I).
- ``traker`` 0.3.2 is on PyPI but is not installed here nor in the GPU image, writes its
  features to memmaps, and scores one output function at a time; the per-example gradients are
  computed here with ``torch.func`` (``vmap`` of ``grad`` over ``functional_call``), as the
  library does internally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

PROJECTION_CHUNK = 1 << 26
"""Entries of the projection matrix generated at a time."""


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """logit of the label minus logsumexp of the other logits (TRAK's and KLOM's margin), in float32."""
    logits = logits.float()
    correct = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return correct - others


def output_logits(output) -> Tensor:
    """A model's output as logits: a tensor, or an output object's ``logits``."""
    return output if isinstance(output, Tensor) else output.logits


@dataclass
class Projector:
    """x ↦ Pᵀx for a ``[inputs, outputs]`` N(0, 1) matrix P drawn from ``seed`` chunk by chunk on ``device``
    (the same matrix for the same seed and device type); the identity when ``outputs >= inputs``."""

    inputs: int
    outputs: int
    seed: int
    device: torch.device

    @property
    def identity(self) -> bool:
        return self.outputs >= self.inputs

    @property
    def dim(self) -> int:
        """The dimension of a projected vector."""
        return self.inputs if self.identity else self.outputs

    def _chunks(self) -> Iterable[tuple[int, Tensor]]:
        rows = max(PROJECTION_CHUNK // self.outputs, 1)
        generator = torch.Generator(self.device)
        for index, start in enumerate(range(0, self.inputs, rows)):
            generator.manual_seed(self.seed * 1_000_003 + index)
            size = min(rows, self.inputs - start)
            yield start, torch.randn(size, self.outputs, generator=generator, device=self.device)

    def project(self, vectors: Tensor) -> Tensor:
        """``[n, inputs]`` → ``[n, dim]``."""
        if self.identity:
            return vectors.float()
        out = torch.zeros(vectors.shape[0], self.outputs, device=vectors.device)
        for start, block in self._chunks():
            out += vectors[:, start : start + len(block)].float() @ block
        return out

    def lift(self, vector: Tensor) -> Tensor:
        """``[dim]`` → ``[inputs]``: P·vector."""
        if self.identity:
            return vector.float()
        return torch.cat([block @ vector.float() for _, block in self._chunks()])


class Checkpoint:
    """One model of the ensemble in functional form: its parameters (detached) and buffers, in eval mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.params = {name: p.detach() for name, p in model.named_parameters()}
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def logits(self, params: dict[str, Tensor], pixel_values: Tensor) -> Tensor:
        state = {**params, **self.buffers}
        return output_logits(functional_call(self.model, state, args=(), kwargs={"pixel_values": pixel_values}))

    def margin_gradients(self, pixel_values: Tensor, labels: Tensor) -> Tensor:
        """Per-example gradients of the margin, flattened in parameter order: ``[n, size]``."""

        def margin(params: dict[str, Tensor], image: Tensor, label: Tensor) -> Tensor:
            return margins(self.logits(params, image.unsqueeze(0)), label.unsqueeze(0)).sum()

        grads = vmap(grad(margin), in_dims=(None, 0, 0))(self.params, pixel_values, labels)
        return torch.cat([grads[name].flatten(1) for name in self.params], dim=1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat parameter-space vector as tensors shaped like the parameters."""
        pieces = flat.split([p.numel() for p in self.params.values()])
        return {name: piece.view_as(p).to(p.dtype) for (name, p), piece in zip(self.params.items(), pieces)}

    def directional_derivative(self, direction: dict[str, Tensor], pixel_values: Tensor) -> Tensor:
        """J(x)·direction: the first-order change of every logit when the parameters move by ``direction``."""
        # forward-mode AD is certain for the native batch norm; cuDNN's kernels are not needed at this size
        with torch.backends.cudnn.flags(enabled=False):
            _, change = jvp(lambda params: self.logits(params, pixel_values), (self.params,), (direction,))
        return change.float()


Batches = Iterable[tuple[Tensor, Tensor]]
"""``(pixel_values, labels)`` batches, on the checkpoints' device."""


@torch.no_grad()
def features(checkpoint: Checkpoint, projector: Projector, batches: Batches) -> tuple[Tensor, Tensor]:
    """TRAK's training features Φ ``[n, dim]`` (projected margin gradients) and out-to-loss weights Q ``[n]``."""
    phis, qs = [], []
    for pixel_values, labels in batches:
        with torch.enable_grad():
            gradients = checkpoint.margin_gradients(pixel_values, labels)
        phis.append(projector.project(gradients))
        probabilities = F.softmax(checkpoint.logits(checkpoint.params, pixel_values).float(), dim=-1)
        qs.append(1 - probabilities.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    return torch.cat(phis), torch.cat(qs)


def kernel_inverse(phi: Tensor, ridge: float) -> Tensor:
    """(ΦᵀΦ + ridge·I)⁻¹ in float64. The library inverts in float32 with ``inv``; the pseudo-inverse is
    the same matrix whenever the kernel is invertible, and stays defined for unprojected gradients
    confined to a subspace (a two-class linear head's margin moves only along w_1 − w_0)."""
    phi = phi.double()
    xtx = phi.T @ phi + ridge * torch.eye(phi.shape[1], dtype=phi.dtype, device=phi.device)
    return torch.linalg.pinv(xtx, hermitian=True)


class RemovalPredictor:
    """The predicted change of every logit when the training examples of a forget set are removed:
    −(1/M) Σ_m J_m(x) P u_m (see the module docstring), for inputs x of the checkpoints' device."""

    def __init__(
        self,
        checkpoints: list[Checkpoint],
        projector: Projector,
        kernels: list[Tensor],
        forget: list[tuple[Tensor, Tensor]],
    ) -> None:
        """:param kernels: each checkpoint's (ΦᵀΦ + λI)⁻¹ over the whole training set;
        :param forget: the forget set's ``(pixel_values, labels)`` batches."""
        per_checkpoint = [features(checkpoint, projector, forget) for checkpoint in checkpoints]
        q_mean = torch.stack([q for _, q in per_checkpoint]).mean(0)
        self.checkpoints = checkpoints
        self.directions = []
        for checkpoint, kernel, (phi, _) in zip(checkpoints, kernels, per_checkpoint):
            u = kernel @ (phi.double().T @ q_mean.double())
            self.directions.append(checkpoint.unflatten(projector.lift(u.float())))

    @torch.no_grad()
    def change(self, pixel_values: Tensor) -> Tensor:
        """``[n, classes]``: the predicted retrained-minus-current logits of each input."""
        total = sum(
            checkpoint.directional_derivative(direction, pixel_values)
            for checkpoint, direction in zip(self.checkpoints, self.directions)
        )
        return -total / len(self.checkpoints)
