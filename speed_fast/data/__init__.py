"""Pre-encoded latent data: the .beton writer, its validation, and the trainer's loader.

    write_latents(path, latents, labels, ...)  -> sidecar dict   (speed_fast.data.latents)
    read_latent_meta(path)                     -> sidecar dict, after validating the file
    write_latents(..., text=, pooled=, text_meta=) -> a captioned file (token + pooled embeddings per record)
    LatentLoader(path, batch_size, ...)        -> (x, y) batches, sharded, resumable (speed_fast.data.loader, FFCV);
                                                  (x, y, tokens, pooled) for a captioned file
    MemmapLoader(path, batch_size, ...)        -> the same batches read with numpy memory maps (no FFCV)
    open_loader(path, batch_size, loader="auto", ...) -> one of the two ("auto": FFCV when it imports)
    ensure_digits_beton(path=None)             -> path of the embedded default dataset (speed_fast.data.digits)
    ensure_captioned_digits(out_dir=None)      -> path of the captioned digits (seed 0, a tiny CLIP of width 32)

FFCV is imported only by LatentLoader (and write_latents(writer="ffcv")): files are written and
validated with numpy (speed_fast.data.beton), so everything but LatentLoader works without FFCV.
"""

from .digits import ensure_captioned_digits, ensure_digits_beton
from .latents import LatentFileError, null_text, read_latent_meta, write_latents
from .choose import LOADERS, open_loader, resolve_loader
from .loader import LatentLoader, LoaderWorkerError
from .memmap_loader import MemmapLoader

__all__ = ["write_latents", "read_latent_meta", "null_text", "LatentLoader", "MemmapLoader", "open_loader", "resolve_loader",
           "LOADERS", "ensure_digits_beton", "ensure_captioned_digits", "LatentFileError", "LoaderWorkerError"]
