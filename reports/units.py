"""Unit conversions done only here: nats per example -> bits per dimension for image data.

The results rows do not carry the image shape, so the number of dimensions of each image
dataset is kept in IMAGE_DIMS below. A dataset not in this table is reported in nats only.
To add one, add its registered name and its pixel count (height * width * channels).
"""
from __future__ import annotations

import math

# dataset name -> number of dimensions D of one example (pixels), for bits/dim
IMAGE_DIMS: dict[str, int] = {
    "digits": 8 * 8,            # scikit-learn's 8x8 digits, binarized
    "binarized-mnist": 28 * 28,  # the fixed binarization of MNIST
}

NATS = "nats"
BITS_PER_DIM = "bits/dim"
NLL_NATS = "NLL nats"  # negative log-likelihood per example, beside published numbers

# How a kind of quantity converts to bits/dim: log-likelihoods (bounds, log p(x)) turn into a
# negative log-likelihood (-value / (D ln 2), lower is better); non-negative quantities in nats
# (gap, KL) keep their sign (value / (D ln 2)); anything else (counts, throughput) is left as is.
BITS_SIGN: dict[str, float] = {"bound": -1.0, "log_marginal": -1.0, "gap": 1.0, "kl": 1.0, "kl_total": 1.0}


def image_dims(dataset: str) -> int | None:
    """The number of dimensions of an image dataset, or None when it is not an image dataset."""
    return IMAGE_DIMS.get(dataset)


def nats_to_bits_per_dim(value: float, stderr: float, dims: int, sign: float) -> tuple[float, float]:
    """(value, stderr) in nats per example -> bits per dimension; sign -1 turns a log-likelihood into an NLL."""
    scale = 1.0 / (dims * math.log(2.0))
    return sign * value * scale, stderr * scale
