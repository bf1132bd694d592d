"""IJB-B / IJB-C 1:1 verification as insightface's ``eval_ijbc.py`` computes it.

- :mod:`.meta`: the three meta files (``read_meta``);
- :mod:`.protocol`: image features -> template features -> pair scores -> TAR@FAR
  (``evaluate_features``), in insightface's float32 arithmetic by default;
- :mod:`.run`: features through a package, the features cache, result files
  (``evaluate_ijb``, ``evaluate_packages``).
"""

from .meta import TARGETS, IJBMeta, meta_paths, read_meta, template_index
from .protocol import (
    AGGREGATION_DTYPES,
    IJBResult,
    TemplateFeatures,
    check_features,
    evaluate_features,
    mode_name,
    pair_scores,
    settle_near_ties,
    template_features,
)
from .run import evaluate_ijb, evaluate_packages, extract_features, load_features

__all__ = [
    "TARGETS",
    "IJBMeta",
    "meta_paths",
    "read_meta",
    "template_index",
    "AGGREGATION_DTYPES",
    "IJBResult",
    "TemplateFeatures",
    "check_features",
    "evaluate_features",
    "mode_name",
    "pair_scores",
    "settle_near_ties",
    "template_features",
    "evaluate_ijb",
    "evaluate_packages",
    "extract_features",
    "load_features",
]
