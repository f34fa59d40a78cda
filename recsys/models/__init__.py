"""Recommendation models as Flax NNX modules: `model(dense, sparse) -> logits [batch]`."""

from recsys.models.baselines import DeepFM, FactorizationMachine, LogisticRegression, WideDeep
from recsys.models.dcnv2 import DCNv2
from recsys.models.dlrm import DLRM
from recsys.models.mlp import MLP

__all__ = ["DCNv2", "DLRM", "MLP", "DeepFM", "FactorizationMachine", "LogisticRegression", "WideDeep"]
