"""Sample quality: the metrics of ADM's evaluator (FID, sFID, IS, precision/recall), the Fréchet
distance of raw data, and training-time evaluation.

One job per module, every public name re-exported here (`from speed_fast.evaluation import ...`):

    frechet.py    frechet_distance, trace_sqrt_product, gaussian_stats
    features.py   RawFeatures ("fd_raw"), make_features, features_of, feature_stats, frechet_between
    inception.py  InceptionNet (pool, sFID spatial features, IS probabilities), InceptionFeatures ("fid"),
                  load_inception, default_inception_path
    download.py   resolve_inception (the weights: explicit path, or the cache, downloaded once and
                  checked against INCEPTION_SHA256; offline settings), InceptionWeightsMissing
    inception_score.py  inception_score (ADM's splits of 5,000)
    manifold.py   manifold_radii, precision_recall (k = 3 nearest-neighbour manifolds)
    clip_score.py clip_score, load_clip, ClipModel, clip_pixels (CLIP score of images against
                  their prompts)
    prompts.py    read_prompts (a generated set's prompts: the .npz's `prompts` array or a text file)
    suite.py      adm_metrics, raw_metrics, format_table (what `speed-fast eval` reports, sharded over ranks)
    refcache.py   reference features cached by content hash
    images.py     open_images, TensorImages (image sets read in uint8 batches, ADM's .npz format)
    arrays.py     load_array, read_array, load_reference (sample and reference sets)
    policy.py     eval_sampling, run_eval_sampling, data_space, sampler_method, EVAL_SAMPLER (one setting)
    evaluator.py  TrainingEvaluator (a fixed-seed sample set during training, sampled by all ranks)
    ratios.py     steps_to_reach, acceleration_ratio
    plots.py      read_quality, plot_quality
"""

from .arrays import ARRAY_KEYS, load_array, load_reference, read_array
from .clip_score import ClipModel, clip_pixels, clip_score, load_clip
from .evaluator import TrainingEvaluator
from .features import RawFeatures, feature_stats, features_of, frechet_between, make_features
from .frechet import frechet_distance, gaussian_stats, trace_sqrt_product
from .download import INCEPTION_SHA256, offline, resolve_inception
from .images import TensorImages, open_images
from .inception import (INCEPTION_ENV, INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, InceptionNet,
                        InceptionWeightsMissing, default_inception_path, load_inception)
from .inception_score import inception_score
from .manifold import manifold_radii, precision_recall
from .plots import QUALITY_KEYS, plot_quality, read_quality
from .prompts import read_prompts
from .policy import EVAL_SAMPLER, SPACES, data_space, eval_sampling, run_eval_sampling, sampler_method
from .ratios import acceleration_ratio, steps_to_reach
from .suite import adm_metrics, format_table, raw_metrics

__all__ = ["ARRAY_KEYS", "EVAL_SAMPLER", "INCEPTION_ENV", "INCEPTION_FILENAME", "INCEPTION_SHA256", "INCEPTION_URL",
           "QUALITY_KEYS", "SPACES", "ClipModel", "InceptionFeatures", "InceptionNet", "InceptionWeightsMissing",
           "RawFeatures", "TensorImages", "TrainingEvaluator", "acceleration_ratio", "adm_metrics",
           "clip_pixels", "clip_score", "data_space", "default_inception_path", "eval_sampling", "feature_stats",
           "features_of", "format_table", "frechet_between", "frechet_distance", "gaussian_stats", "inception_score",
           "load_array", "load_clip", "load_inception", "load_reference", "make_features", "manifold_radii", "offline",
           "open_images", "plot_quality", "precision_recall", "raw_metrics", "read_array", "read_prompts",
           "read_quality", "resolve_inception", "run_eval_sampling", "sampler_method", "steps_to_reach",
           "trace_sqrt_product"]
