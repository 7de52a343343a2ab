"""The serialized model format shared by the trainer (writer) and the prediction service (reader).

A bundle is JSON: ``{"format": 1, "feature_names": [...], "quantiles": {"0.1": <LightGBM model text>,
"0.5": ..., "0.9": ...}}``. The 0.5 model is the point estimate; 0.1/0.9 bound the range.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

__all__ = ["QUANTILES", "EtaModel", "dump_bundle", "load_bundle"]

QUANTILES = (0.1, 0.5, 0.9)
FORMAT = 1


def dump_bundle(feature_names: Sequence[str], boosters: Mapping[float, lgb.Booster]) -> bytes:
    return json.dumps(
        {
            "format": FORMAT,
            "feature_names": list(feature_names),
            "quantiles": {str(q): boosters[q].model_to_string() for q in QUANTILES},
        }
    ).encode()


@dataclass
class EtaModel:
    """Quantile boosters; ``predict`` returns (point, low, high) in minutes, with low ≤ point ≤ high."""

    version: str
    feature_names: list[str]
    boosters: dict[float, lgb.Booster]

    def predict(
        self, rows: npt.NDArray[np.float64]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        preds = np.vstack(
            [np.asarray(self.boosters[q].predict(rows, num_threads=1), dtype=np.float64) for q in QUANTILES]
        )
        preds.sort(axis=0)  # quantile crossing can happen; ranges must stay ordered
        low, point, high = preds[0], preds[1], preds[2]
        return point, low, high


def load_bundle(version: str, blob: bytes) -> EtaModel:
    data = json.loads(blob)
    if data.get("format") != FORMAT:
        raise ValueError(f"unsupported model bundle format {data.get('format')!r}")
    boosters = {float(q): lgb.Booster(model_str=text) for q, text in data["quantiles"].items()}
    return EtaModel(version=version, feature_names=list(data["feature_names"]), boosters=boosters)
