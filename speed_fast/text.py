"""The text encoder of text-to-image runs: captions -> CLIP token and pooled embeddings.

* Which encoder (`--text-encoder NAME`, `load_text_encoder`): NAME is a local directory saved with
  transformers' save_pretrained holding a CLIPTextModel (or a CLIPModel, whose text tower is used)
  and its CLIPTokenizer, or a Hugging Face hub id (e.g. openai/clip-vit-large-patch14) resolved by
  huggingface_hub as `--vae` is: downloaded into the hub cache on first use, read from there
  afterwards, nothing downloaded with HF_HUB_OFFLINE=1. A name that cannot be had is one line
  (ValueError) naming it and what was expected.
* What a caption becomes (`TextEncoder.encode`): the tokenizer pads to, and truncates at, its
  model_max_length L (77 for CLIP), as CLIP does (a caller warns once with the number truncated);
  tokens = the text model's last_hidden_state [L, D], pooled = its pooler_output [D] (the final
  layer norm's output at the end-of-text token), both float32, computed in float32 without an
  attention mask (the causal mask already hides the padding from every earlier token), as
  Stable Diffusion's pipelines call CLIP.
* `build_tiny_clip(dir, seed)`: a small CLIPTextModel with random weights drawn from `seed` and a
  tiny tokenizer written here (every byte as a character, plus whole words of the captions used in
  tests and in the captioned digits set as BPE merges). No pretrained CLIP can be had on the
  machines this project is tested on, so tests and the CPU text-to-image verdict use it; its
  embeddings carry no meaning beyond telling captions apart.

transformers is imported only when a text encoder is built or loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

# Words given whole-word BPE merges by build_tiny_clip: the captioned digits set's phrasings and test captions.
TINY_WORDS = (
    "a the an of and with in on by to is number digit digits handwritten hand drawn written picture photo image "
    "zero one two three four five six seven eight nine "
    "0 1 2 3 4 5 6 7 8 9 cat dog red blue green small big black white on grey gray"
).split()
_EXPECTED = ("a local directory saved with save_pretrained (a CLIPTextModel or CLIPModel and its CLIPTokenizer) "
             "or a hub id such as openai/clip-vit-large-patch14")


@contextlib.contextmanager
def quiet_transformers():
    """transformers without its progress bars and warnings (the length warning of a caption longer than L:
    truncation is reported by the caller, once, with the count)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table (the alphabet of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab(words: Sequence[str] = TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of a byte-level BPE: every byte alone and as a word end, then each word built
    left to right by merges (so each listed word is one token; any other text still tokenizes, by
    characters)."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(tokens)
    for word in words:
        enc = "".join(_bytes_to_unicode()[b] for b in word.lower().encode("utf-8"))
        if len(enc) < 2:
            continue
        parts = list(enc[:-1]) + [enc[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if merged not in seen:
                merges.append(f"{left} {right}")
                tokens.append(merged)
                seen.add(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tiny_clip(directory: str | os.PathLike, seed: int = 0, width: int = 32, layers: int = 2, heads: int = 2,
                    max_tokens: int = 77, words: Sequence[str] = TINY_WORDS) -> str:
    """Save a small random CLIPTextModel (weights drawn from `seed`: the same seed, the same weights)
    and its tiny tokenizer into `directory` (created); returns the directory, loadable with
    load_text_encoder. width: D; max_tokens: L."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = tiny_vocab(words)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=max_tokens)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                            projection_dim=width, num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=max_tokens, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
    return directory


@dataclass
class TextEncoder:
    """A CLIP text model and its tokenizer: `encode(captions)` -> (tokens, pooled, truncated)."""

    name: str
    model: object
    tokenizer: object
    device: torch.device
    record: dict  # identity for sidecars: name, source, path, revision

    @property
    def width(self) -> int:
        """D: the width of the token and pooled embeddings."""
        return int(self.model.config.hidden_size)

    @property
    def max_tokens(self) -> int:
        """L: tokens per caption (the tokenizer's model_max_length)."""
        return int(self.tokenizer.model_max_length)

    def tokenize(self, captions: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption, untruncated (len > max_tokens: the caption will be truncated)."""
        with quiet_transformers():
            return self.tokenizer(list(captions), padding=False, truncation=False)["input_ids"]

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens fp32 [B, L, D], pooled fp32 [B, D], truncated bool [B]) on the CPU for `captions`."""
        captions = list(captions)
        if not all(isinstance(c, str) for c in captions):
            bad = next(c for c in captions if not isinstance(c, str))
            raise ValueError(f"captions must be strings, got {type(bad).__name__} {bad!r:.80}")
        L = self.max_tokens
        full = self.tokenize(captions)
        truncated = torch.tensor([len(ids) > L for ids in full], dtype=torch.bool)
        ids = self.tokenizer(captions, padding="max_length", truncation=True, max_length=L,
                             return_tensors="pt")["input_ids"].to(self.device)  # (B, L)
        out = self.model(input_ids=ids)
        tokens = out.last_hidden_state.float().cpu()  # (B, L, D)
        pooled = out.pooler_output.float().cpu()  # (B, D)
        return tokens, pooled, truncated


def resolve_text_encoder(name: str, flag: str = "--text-encoder", expected: str = _EXPECTED) -> dict:
    """Where the text encoder `name` is: {"name", "source": "directory" | "hub", "path", "local", "revision"}.
    A hub id is downloaded into the hub cache on first use (HF_HUB_OFFLINE=1: the cache only). `expected`:
    what the error lines say `flag` takes (CLIP score resolves its CLIPModel here too)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{flag} {name!r}: expected {expected}")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{flag} {name!r} is a directory without config.json; expected {expected}")
        return {"name": name, "source": "directory", "path": os.path.abspath(path), "local": os.path.abspath(path),
                "revision": None}
    parts = name.split("/")
    if os.path.isabs(name) or name.startswith((".", "~")) or len(parts) != 2 or not all(parts):
        raise ValueError(f"{flag} {name!r}: no such directory; expected {expected}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled

    offline = constants.HF_HUB_OFFLINE
    hint = (f"not in the hub cache {constants.HF_HUB_CACHE} and HF_HUB_OFFLINE=1 forbids downloading it (run once "
            "without HF_HUB_OFFLINE, or pass a local directory)" if offline else
            "check the name and your network (HF_HUB_OFFLINE=1 uses the hub cache only)")
    try:
        local = snapshot_download(name, local_files_only=offline,
                                  allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except HFValidationError as exc:
        raise ValueError(f"{flag} {name!r}: not a local directory, and not a valid hub id ({exc}); "
                         f"expected {expected}") from None
    except OfflineModeIsEnabled:
        raise ValueError(f"{flag} {name!r}: no such local directory, and the hub repository is {hint}") from None
    except OSError as exc:  # RepositoryNotFoundError, HTTP and connection errors, LocalEntryNotFoundError
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"{flag} {name!r}: no such local directory, and the hub repository could not be read: "
                         f"{type(exc).__name__}: {reason}; {hint}") from None
    return {"name": name, "source": "hub", "path": name, "local": local, "revision": os.path.basename(local)}


def load_text_encoder(name_or_dir: str, device="cpu", flag: str = "--text-encoder") -> TextEncoder:
    """The CLIP text encoder named `name_or_dir` (module docstring) in eval mode, float32, on `device`."""
    where = resolve_text_encoder(name_or_dir, flag)
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        with open(os.path.join(where["local"], "config.json")) as f:
            config = json.load(f)
        with quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(where["local"], local_files_only=True)
            model = CLIPTextModel.from_pretrained(where["local"], local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{flag} {name_or_dir!r}: could not load a CLIP text model and tokenizer from "
                         f"{where['local']} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
                         f"expected {_EXPECTED}") from None
    if config.get("model_type") not in ("clip_text_model", "clip"):
        raise ValueError(f"{flag} {name_or_dir!r}: config model_type {config.get('model_type')!r}, expected "
                         "'clip_text_model' or 'clip'")
    device = torch.device(device)
    record = {k: where[k] for k in ("name", "source", "path", "revision")}
    return TextEncoder(name=name_or_dir, model=model.to(device).eval(), tokenizer=tokenizer, device=device,
                       record=record)
