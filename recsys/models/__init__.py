"""Recommendation models as Flax NNX modules: `model(dense, sparse) -> logits [batch]`."""

from recsys.models.baselines import DeepFM, FactorizationMachine, LogisticRegression, WideDeep
from recsys.models.dcnv2 import DCNv2
from recsys.models.din import DIN
from recsys.models.dlrm import DLRM
from recsys.models.mlp import MLP

__all__ = ["DCNv2", "DIN", "DLRM", "MLP", "DeepFM", "FactorizationMachine", "LogisticRegression", "WideDeep"]
