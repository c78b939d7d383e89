"""Pre-encoded latent data: the .beton writer, its validation, and the trainer's loader.

    write_latents(path, latents, labels, ...)  -> sidecar dict   (speed_fast.data.latents)
    read_latent_meta(path)                     -> sidecar dict, after validating the file
    LatentLoader(path, batch_size, ...)        -> (x, y) batches, sharded, resumable (speed_fast.data.loader)
    ensure_digits_beton(path=None)             -> path of the embedded default dataset (speed_fast.data.digits)

FFCV is imported only when a file is written or read, so `import speed_fast.data` is cheap.
"""

from .digits import ensure_digits_beton
from .latents import LatentFileError, read_latent_meta, write_latents
from .loader import LatentLoader, LoaderWorkerError

__all__ = ["write_latents", "read_latent_meta", "LatentLoader", "ensure_digits_beton",
           "LatentFileError", "LoaderWorkerError"]
