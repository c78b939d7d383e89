"""Caption files and their text embeddings, for captioned latent / pixel files (`--captions FILE`).

A caption file pairs images with captions, in one of two layouts (told apart by their content):
  JSON lines   one object per line, {"image": path relative to the image folder, "caption": str}
               (blank lines are skipped; other keys are ignored)
  COCO         one JSON object as MS-COCO's captions_*.json: "images": [{"id", "file_name"}, ...],
               "annotations": [{"image_id", "caption"}, ...]
There is one record per (image, caption) pair, in file order (COCO: the order of "annotations");
an image with five captions is five records holding the same latent. Each distinct image is read
and encoded once. A record's label is the index of its image in the order images first appear.

`CaptionText` embeds the captions with a speed_fast.text.TextEncoder lazily, a slice at a time
(write_latents reads text and pooled embeddings `chunk` records at a time), in batches cut at
multiples of TEXT_BATCH from the first record, so the bytes do not depend on how the file is
written; `text_meta` gives the sidecar's "text" section, with the null caption ("") encoded alone.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

TEXT_BATCH = 64  # captions per text-encoder forward pass


def read_captions(path: str) -> list[tuple[str, str]]:
    """[(image path, caption)] of a caption file, in file order. ValueError (one line) for a file that is
    missing, empty (no pair), or in neither layout."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--captions {path!r}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not text.strip():
        raise ValueError(f"--captions {path!r} is empty; expected JSON lines of {{\"image\", \"caption\"}} or a "
                         "COCO captions_*.json")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and ("annotations" in whole or "images" in whole):
        pairs = _coco(path, whole)
    else:
        pairs = _json_lines(path, text)
    if not pairs:
        raise ValueError(f"--captions {path!r} holds no (image, caption) pair")
    return pairs


def _neither(path: str, why: str) -> ValueError:
    return ValueError(f"--captions {path!r} is in neither known layout ({why}); expected JSON lines of "
                      "{\"image\": relative path, \"caption\": text} or a COCO captions_*.json "
                      "(\"images\": [{\"id\", \"file_name\"}], \"annotations\": [{\"image_id\", \"caption\"}])")


def _coco(path: str, data: dict) -> list[tuple[str, str]]:
    images, notes = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(notes, list):
        raise _neither(path, "a COCO file needs lists 'images' and 'annotations'")
    names = {}
    for im in images:
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or "id" not in im:
            raise _neither(path, f"COCO image entry {im!r:.100} lacks 'id' or 'file_name'")
        names[im["id"]] = im["file_name"]
    pairs = []
    for k, a in enumerate(notes):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or "image_id" not in a:
            raise _neither(path, f"COCO annotation {k} {a!r:.100} lacks 'image_id' or a string 'caption'")
        if a["image_id"] not in names:
            raise ValueError(f"--captions {path!r}: annotation {k} names image_id {a['image_id']!r}, which no entry of "
                             "'images' has")
        pairs.append((names[a["image_id"]], a["caption"]))
    return pairs


def _json_lines(path: str, text: str) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise _neither(path, f"line {n} is not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(rec.get("caption"), str):
            raise _neither(path, f"line {n} is not an object with string 'image' and 'caption'")
        pairs.append((rec["image"], rec["caption"]))
    return pairs


def caption_images(path: str, image_dir: str) -> dict:
    """The caption file `path` against the images under `image_dir`: {"images": distinct image paths in
    order of first appearance, "pairs": image index per record (int64), "captions": [str], "sha256":
    of the file's pairs}. ValueError naming the first missing image and how many are missing."""
    pairs = read_captions(path)
    index: dict[str, int] = {}
    for image, _ in pairs:
        index.setdefault(image, len(index))
    images = list(index)
    missing = [p for p in images if not os.path.isfile(os.path.join(image_dir, p))]
    if missing:
        raise ValueError(f"--captions {path!r} names {len(missing)} image(s) not found under {image_dir!r} (or not "
                         f"regular files), the first {missing[0]!r}; image paths are relative to the image folder")
    listing = json.dumps(pairs, ensure_ascii=False).encode()
    return {"images": images, "pairs": np.asarray([index[p] for p, _ in pairs], dtype=np.int64),
            "captions": [c for _, c in pairs], "sha256": hashlib.sha256(listing).hexdigest()}


class CaptionText:
    """The text embeddings of `captions` as two array-likes for write_latents: `.text` [N, L, D] and
    `.pooled` [N, D] (float32), computed a slice at a time (the last slice is kept for the other view).
    `truncated` counts the captions longer than L seen so far."""

    def __init__(self, encoder, captions: list[str]):
        self.encoder, self.captions = encoder, captions
        self.truncated = 0
        self._cache = (None, None, None)  # (start, stop), tokens, pooled
        n, L, D = len(captions), encoder.max_tokens, encoder.width
        self.text = _View(self, 1, (n, L, D))
        self.pooled = _View(self, 2, (n, D))

    def _slice(self, start: int, stop: int):
        if self._cache[0] != (start, stop):
            tokens, pooled = [], []
            at = start
            while at < stop:  # batches cut at multiples of TEXT_BATCH from record 0
                end = min(stop, (at // TEXT_BATCH + 1) * TEXT_BATCH)
                t, p, trunc = self.encoder.encode(self.captions[at:end])
                tokens.append(t)
                pooled.append(p)
                self.truncated += int(trunc.sum())
                at = end
            self._cache = ((start, stop), torch.cat(tokens), torch.cat(pooled))
        return self._cache

    def count_truncated(self) -> int:
        """How many captions are longer than the encoder takes (tokenizer only; they are truncated, as CLIP does)."""
        L, count = self.encoder.max_tokens, 0
        for at in range(0, len(self.captions), 1024):
            count += sum(len(ids) > L for ids in self.encoder.tokenize(self.captions[at:at + 1024]))
        return count

    def text_meta(self, **extra) -> dict:
        """write_latents' text_meta: the encoder's name and identity, the null caption's embedding, `extra`."""
        t, p, _ = self.encoder.encode([""])
        return {"encoder": self.encoder.name, "encoder_record": self.encoder.record,
                "null": {"tokens": t[0], "pooled": p[0]}, **extra}


class _View:
    def __init__(self, owner: CaptionText, which: int, shape: tuple):
        self.owner, self.which, self.shape = owner, which, shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sl: slice) -> torch.Tensor:
        start, stop, step = sl.indices(self.shape[0])
        if step != 1:
            raise ValueError("caption embeddings are read in contiguous slices")
        return self.owner._slice(start, stop)[self.which]
