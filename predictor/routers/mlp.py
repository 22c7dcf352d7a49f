"""A small torch MLP with one sigmoid head per scale, exported with torch's ONNX exporter.

torch is imported lazily so that LightGBM and logistic routers, and every loaded (ONNX)
router, work without paying torch's import time.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import onnx

from predictor.routers.base import ProbabilityEstimator
from predictor.serving import finalize_graph

__all__ = ["MLPEstimator"]


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs optional-package notes and deprecations on every export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _build(width: int, hidden: tuple[int, ...], n_out: int, dropout: float):  # -> nn.Module
    import torch
    from torch import nn

    class Net(nn.Module):
        """Standardisation and sigmoid live inside the module so the export is self-contained."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(width))
            self.register_buffer("std", torch.ones(width))
            layers: list[nn.Module] = []
            d = width
            for h in hidden:
                layers += [nn.Linear(d, h), nn.ReLU()]
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
                d = h
            layers.append(nn.Linear(d, n_out))
            self.body = nn.Sequential(*layers)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.body((x - self.mean) / self.std)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return Net()


class MLPEstimator(ProbabilityEstimator):
    """ReLU MLP, multi-label BCE over the S scales, Adam with weight decay, fixed epochs.

    Shared hidden layers let the scales borrow strength from each other, which helps when
    the largest scales have few wrong answers to learn from. `num_threads` is torch's
    intra-op thread count during `fit` only (restored afterwards): matrices this small train
    2-3x faster on one thread than on two busy cores; None leaves torch's setting alone.
    """

    name = "mlp"

    def __init__(
        self,
        hidden: tuple[int, ...] = (64,),
        epochs: int = 60,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        dropout: float = 0.0,
        random_state: int = 0,
        num_threads: int | None = 1,
    ):
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.dropout = dropout
        self.random_state = random_state
        self.num_threads = num_threads

    def fit(self, X: np.ndarray, Y: np.ndarray) -> MLPEstimator:
        import torch

        X = np.asarray(X, dtype=np.float32)
        Y = np.asarray(Y, dtype=np.float32)
        n, width = X.shape
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(int(self.num_threads))
        try:
            self._train(X, Y)
        finally:
            torch.set_num_threads(threads)
        self.n_features_in_ = width
        self.n_outputs_ = Y.shape[1]
        return self

    def _train(self, X: np.ndarray, Y: np.ndarray) -> None:
        import torch

        n, width = X.shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            net = _build(width, tuple(int(h) for h in self.hidden), Y.shape[1], self.dropout)
            net.mean.copy_(torch.from_numpy(X.mean(axis=0)))
            std = X.std(axis=0)
            net.std.copy_(torch.from_numpy(np.where(std > 1e-6, std, 1.0).astype(np.float32)))
            opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            loss_fn = torch.nn.BCEWithLogitsLoss()
            xt, yt = torch.from_numpy(X), torch.from_numpy(Y)
            gen = torch.Generator().manual_seed(self.random_state)
            bs = max(1, min(int(self.batch_size), n))
            net.train()
            for _ in range(int(self.epochs)):
                perm = torch.randperm(n, generator=gen)
                for start in range(0, n, bs):
                    b = perm[start : start + bs]
                    opt.zero_grad()
                    loss_fn(net.logits(xt[b]), yt[b]).backward()
                    opt.step()
        net.eval()
        self.net_ = net

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        self._check_fitted()
        with torch.no_grad():
            P = self.net_(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)))
        return P.numpy().astype(np.float64)

    def to_onnx(self) -> onnx.ModelProto:
        import torch

        self._check_fitted()
        dummy = torch.zeros(2, self.n_features_in_)
        with _quiet_exporter():
            program = torch.onnx.export(
                self.net_,
                (dummy,),
                input_names=["X"],
                output_names=["P"],
                dynamic_shapes=({0: torch.export.Dim("n")},),
                dynamo=True,
                verbose=False,
            )
        return finalize_graph(program.model_proto, self.n_features_in_, self.n_outputs_)
