"""IJB-B / IJB-C 1:1 verification as insightface's ``eval_ijbc.py`` computes it, and 1:N
identification as its ``ijb_evals.py`` does.

- :mod:`.meta`: the three meta files (``read_meta``);
- :mod:`.meta_1n`: the three 1:N list files, galleries and probes (``read_1n_lists``);
- :mod:`.protocol`: image features -> template features -> pair scores -> TAR@FAR
  (``evaluate_features``), in insightface's float32 arithmetic by default;
- :mod:`.protocol_1n`: the same template features -> open-set search -> TPIR@FPIR, rank-k
  (``evaluate_features_1n``);
- :mod:`.run`: features through a package, the features cache, result files
  (``evaluate_ijb``, ``evaluate_protocols``, ``evaluate_packages``).
"""

from .meta import TARGETS, IJBMeta, meta_paths, read_meta, template_index
from .meta_1n import IJB1NLists, TemplateList, has_1n_lists, list_paths, read_1n_lists, read_template_list
from .protocol import (
    AGGREGATION_DTYPES,
    IJBResult,
    TemplateFeatures,
    aggregate_templates,
    check_features,
    evaluate_features,
    mode_name,
    pair_scores,
    settle_near_ties,
    template_features,
)
from .protocol_1n import (
    RANKS,
    GallerySearch,
    IJB1NResult,
    evaluate_features_1n,
    fpir_grid,
    search_gallery,
    threshold_index,
)
from .run import PROTOCOLS, evaluate_ijb, evaluate_packages, evaluate_protocols, extract_features, load_features

__all__ = [
    "TARGETS",
    "IJBMeta",
    "meta_paths",
    "read_meta",
    "template_index",
    "IJB1NLists",
    "TemplateList",
    "has_1n_lists",
    "list_paths",
    "read_1n_lists",
    "read_template_list",
    "AGGREGATION_DTYPES",
    "IJBResult",
    "TemplateFeatures",
    "aggregate_templates",
    "check_features",
    "evaluate_features",
    "mode_name",
    "pair_scores",
    "settle_near_ties",
    "template_features",
    "RANKS",
    "GallerySearch",
    "IJB1NResult",
    "evaluate_features_1n",
    "fpir_grid",
    "search_gallery",
    "threshold_index",
    "PROTOCOLS",
    "evaluate_ijb",
    "evaluate_protocols",
    "evaluate_packages",
    "extract_features",
    "load_features",
]
