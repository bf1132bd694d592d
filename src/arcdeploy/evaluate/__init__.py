"""Accuracy: IJB-B / IJB-C 1:1 verification and LFW-style .bin sets, computed as insightface does.

- :mod:`.roc`: sklearn's ROC and insightface's TAR@FAR point selection, ``FARS``, the tables;
- :mod:`.ijb`: meta files, template aggregation, pair scores, ``evaluate_ijb``;
- :mod:`.binsets`: restricted .bin reading, 10-fold accuracy, ``evaluate_bins``;
- :mod:`.plots`: the ROC plot.
"""

from .roc import FARS, format_tar_table, tar_at_far

__all__ = ["FARS", "format_tar_table", "tar_at_far"]
