"""Recommendation models as Flax NNX modules: `model(dense, sparse) -> logits [batch]`."""

from recsys.models.dcnv2 import DCNv2
from recsys.models.dlrm import DLRM
from recsys.models.linear import FactorizationMachine, LogisticRegression
from recsys.models.mlp import MLP

__all__ = ["DCNv2", "DLRM", "MLP", "FactorizationMachine", "LogisticRegression"]
