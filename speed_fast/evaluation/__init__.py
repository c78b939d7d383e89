"""Sample quality: the Fréchet distance, FID with local Inception weights, and training-time evaluation.

One job per module, every public name re-exported here (`from speed_fast.evaluation import ...`):

    frechet.py    frechet_distance, trace_sqrt_product, gaussian_stats
    features.py   RawFeatures ("fd_raw"), make_features, features_of, feature_stats, frechet_between
    inception.py  InceptionFeatures ("fid"), load_inception, default_inception_path, InceptionWeightsMissing
    arrays.py     load_array, read_array, load_reference (sample and reference sets)
    policy.py     eval_sampling, run_eval_sampling, data_space, sampler_method, EVAL_SAMPLER (one setting)
    evaluator.py  TrainingEvaluator (a fixed-seed sample set during training, sampled by all ranks)
    ratios.py     steps_to_reach, acceleration_ratio
    plots.py      read_quality, plot_quality
"""

from .arrays import ARRAY_KEYS, load_array, load_reference, read_array
from .evaluator import TrainingEvaluator
from .features import RawFeatures, feature_stats, features_of, frechet_between, make_features
from .frechet import frechet_distance, gaussian_stats, trace_sqrt_product
from .inception import (INCEPTION_ENV, INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, InceptionWeightsMissing,
                        default_inception_path, load_inception)
from .plots import QUALITY_KEYS, plot_quality, read_quality
from .policy import EVAL_SAMPLER, SPACES, data_space, eval_sampling, run_eval_sampling, sampler_method
from .ratios import acceleration_ratio, steps_to_reach

__all__ = ["ARRAY_KEYS", "EVAL_SAMPLER", "INCEPTION_ENV", "INCEPTION_FILENAME", "INCEPTION_URL", "QUALITY_KEYS",
           "SPACES", "InceptionFeatures", "InceptionWeightsMissing", "RawFeatures", "TrainingEvaluator",
           "acceleration_ratio", "data_space", "default_inception_path", "eval_sampling", "feature_stats",
           "features_of", "frechet_between", "frechet_distance", "gaussian_stats", "load_array", "load_inception",
           "load_reference", "make_features", "plot_quality", "read_array", "read_quality", "run_eval_sampling",
           "sampler_method", "steps_to_reach", "trace_sqrt_product"]
