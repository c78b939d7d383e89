"""The Inception Score of a sample set from its class probabilities, with ADM's split convention.

    IS = mean over splits s of exp( mean_{i in s} KL(p_i || mean_{j in s} p_j) )

The splits are consecutive runs of `split_size` samples in file order (ADM's evaluator: 5,000;
50,000 samples make 10 splits; the last split keeps whatever is left, and every split counts
equally in the mean). The probabilities are softmax(pool_3 @ W^T) without the output bias over
1008 classes (`InceptionNet.probabilities`). Entries that are exactly 0 add 0 (p log p -> 0).
"""

from __future__ import annotations

import operator

import numpy as np
import torch

ADM_SPLIT_SIZE = 5000


def inception_score(probs, split_size: int = ADM_SPLIT_SIZE) -> float:
    """IS of probabilities [N, K] (rows sum to 1), over consecutive splits of `split_size` rows."""
    p = probs.detach().cpu().double().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    split_size = operator.index(split_size)
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"probabilities must be [N >= 1, K], got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and >= 0")
    scores = []
    for start in range(0, p.shape[0], split_size):
        part = p[start:start + split_size]
        log_part = np.log(np.where(part > 0, part, 1.0))               # 0 log 0 = 0
        log_marginal = np.log(np.maximum(part.mean(axis=0), np.finfo(np.float64).tiny))
        kl = (part * (log_part - log_marginal)).sum(axis=1)             # (n_split,)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores))
