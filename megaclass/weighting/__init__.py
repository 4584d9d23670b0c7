"""Per-image loss weights from side information: keywords, stage 1 (rank + KNN), stage 2 (text)."""
from megaclass.weighting.metrics import roc_auc
from megaclass.weighting.stage1 import knn_arrays, stage1_weights
from megaclass.weighting.stage2 import Stage2Config, stage2_weights
from megaclass.weighting.tables import (Predictions, TableError, read_predictions, read_weights, write_predictions,
                                        write_weights)

__all__ = ["Predictions", "Stage2Config", "TableError", "knn_arrays", "read_predictions",
           "read_weights", "roc_auc", "stage1_weights", "stage2_weights", "write_predictions", "write_weights"]
