"""Training data (plumbing): the images of --data, and the (gt, lr) pairs made from them in worker
processes (paper §5.1): a random HR crop and its degraded LR, with the image's prompt embedding.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import degrade
from plumbing.checkpoints import load_embedding
from plumbing.images import find_images, usable_images

CACHE_BYTES = 512 * 2 ** 20     # decoded images each data worker keeps in memory


def random_crop(img, size, g):
    """(3, H, W) uint8 or in [0, 1] -> degrade's random (3, size, size) crop in [0, 1]; of uint8, only it made float."""
    if min(img.shape[1:]) < size and img.dtype == torch.uint8:
        img = img.float() / 255
    crop = degrade.random_crop_pair_source(img, size, g)[0]
    return crop.float() / 255 if crop.dtype == torch.uint8 else crop


class PairDataset(torch.utils.data.Dataset):
    """Item (index, seed) -> dict(gt, lr, context, pooled, name), or dict(unreadable=path, why=...).
    default: the prompt (a Cond without z_lr) of images without an embedding file."""

    def __init__(self, paths, size, default, degrade_cfg, clean_prob=0.0):
        self.paths, self.size, self.default, self.degrade_cfg = paths, size, default, degrade_cfg
        self.clean_prob = clean_prob
        self.decoded, self.decoded_bytes = {}, 0    # decoded images kept per worker, up to CACHE_BYTES

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, seed = key
        path = self.paths[i]
        arr = self.decoded.get(path)
        if arr is None:
            try:
                with Image.open(path) as im:
                    arr = np.array(im.convert("RGB"))                     # (H, W, 3) uint8
            except Exception as e:  # PIL raises many types for truncated / odd files
                return dict(unreadable=path, why=str(e))
            if self.decoded_bytes + arr.nbytes <= CACHE_BYTES:   # small data sets: decode each file once
                self.decoded[path] = arr
                self.decoded_bytes += arr.nbytes
        g = torch.Generator().manual_seed(seed)
        hr = random_crop(torch.from_numpy(arr).permute(2, 0, 1), self.size, g)
        if self.clean_prob > 0 and torch.rand((), generator=g) < self.clean_prob:
            gt, lr = hr[None], degrade.bicubic_down(hr[None], self.degrade_cfg.scale)
        else:
            gt, lr, _ = degrade.degrade(hr[None], self.degrade_cfg, generator=g)
        e = load_embedding(os.path.splitext(path)[0] + ".safetensors", self.default)
        return dict(gt=gt[0], lr=lr[0], context=e.context, pooled=e.pooled, name=path)


def collate(items):
    """A batch dict; `unreadable`: (path, why) of the items that could not be read."""
    unreadable = [(it["unreadable"], it["why"]) for it in items if "unreadable" in it]
    items = [it for it in items if "unreadable" not in it]
    if not items:
        return dict(unreadable=unreadable)
    L = max(it["context"].shape[0] for it in items)
    return dict(gt=torch.stack([it["gt"] for it in items]), lr=torch.stack([it["lr"] for it in items]),
                context=torch.stack([F.pad(it["context"], (0, 0, 0, L - it["context"].shape[0])) for it in items]),
                pooled=torch.stack([it["pooled"] for it in items]),
                names=[it["name"] for it in items], unreadable=unreadable)


def training_images(cfg, rank):
    """(usable image paths of --data, {skipped path: why}); rank 0 says what it skips."""
    say = (lambda m: print(m, file=sys.stderr)) if rank == 0 else (lambda m: None)
    paths, skipped = usable_images(find_images(cfg.data), cfg.size, say)
    uncoded = [q for q in paths if os.path.exists(os.path.splitext(q)[0] + ".txt")
               and not os.path.exists(os.path.splitext(q)[0] + ".safetensors")]
    if uncoded and rank == 0:
        print(f"warning: {len(uncoded)} captions (e.g. {os.path.splitext(uncoded[0])[0]}.txt) have no embedding "
              "file; they train with the default prompt. Encode them first: "
              "python tools/text.py --data DIR --encoders ...")
    return paths, skipped
