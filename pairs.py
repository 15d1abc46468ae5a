"""The training data: HR images -> (gt, lr) pairs made in worker processes (paper §5.1), and the
prompt conditioning read from embedding files beside the images.

    paths = find_images("photos/,more/")                       # recursive, sorted
    data = PairDataset(paths, 512, null, degrade.DegradeConfig(gt_size=512))
    loader = DataLoader(data, batch_sampler=StepBatches(len(paths), 10, seed, rank, 0, steps),
                        collate_fn=collate)

A pair: a random HR crop (`usable_images` leaves out the files smaller than the crop before
training: an upscaled "HR" would teach blur), degraded with the Real-ESRGAN
pipeline (degrade.py) to LR at 1/4, or with probability clean_prob the plain bicubic x4. Which
images and which degradation a step sees is a function of (seed, step, rank) alone (`StepBatches`,
`mix`), so a resumed run sees what an uninterrupted one would.
"""
import glob
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoint import CheckpointError, SafetensorsFiles
from images import EXTS as IMAGE_EXTS

CACHE_BYTES = 512 * 2 ** 20     # decoded images each data worker keeps in memory
MAX_NAMED = 20                  # skipped images named one by one before a count




def find_images(data):
    paths = []
    for root in [d for d in data.split(",") if d]:
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data {root}: no such folder")
        paths += sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                        if p.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise SystemExit(f"error: --data {data}: no images ({', '.join(IMAGE_EXTS)}) found")
    return paths


def usable_images(paths, size, say=print):
    """The paths Pillow opens whose shorter side is at least `size`. Every other file is named once
    through `say` (at most MAX_NAMED lines, then a count); SystemExit before any training if none is
    left. Returns (usable, {path: why not})."""
    usable, skipped = [], {}
    for p in paths:
        try:
            with Image.open(p) as im:                     # the header only
                W, H = im.size
        except Exception as e:                            # PIL raises many types for corrupt files
            skipped[p] = f"unreadable ({e})"
            continue
        if min(W, H) < size:
            skipped[p] = f"{W}x{H}, smaller than the {size}x{size} crop (upscaling it would teach blur)"
            continue
        usable.append(p)
    for k, (p, why) in enumerate(skipped.items()):
        if k == MAX_NAMED:
            say(f"warning: ... and {len(skipped) - MAX_NAMED} more images skipped")
            break
        say(f"warning: skipping {p}: {why}")
    if not usable:
        raise SystemExit(f"error: none of the {len(paths)} images in --data is usable: {len(skipped)} skipped "
                         f"(unreadable, or smaller than the {size}x{size} crop)")
    return usable, skipped


def random_crop(img, size, g):
    """(3, H, W) uint8 or in [0, 1] -> (3, size, size) in [0, 1]: smaller images upscaled (bicubic)
    first; of a large uint8 image only the crop is converted to float."""
    _, H, W = img.shape
    if min(H, W) < size:
        img = img.float() / 255 if img.dtype == torch.uint8 else img
        k = size / min(H, W)
        img = F.interpolate(img[None], size=(max(size, round(H * k)), max(size, round(W * k))),
                            mode="bicubic", align_corners=False)[0].clamp(0, 1)
        _, H, W = img.shape
    y = int(torch.randint(0, H - size + 1, (1,), generator=g))
    x = int(torch.randint(0, W - size + 1, (1,), generator=g))
    crop = img[:, y:y + size, x:x + size]
    return crop.float() / 255 if crop.dtype == torch.uint8 else crop


class PairDataset(torch.utils.data.Dataset):
    """Item (index, seed) -> dict(gt, lr, context, pooled, name), or dict(unreadable=path)."""

    def __init__(self, paths, size, default, degrade_cfg, clean_prob=0.0):
        """default: the (context, pooled) of images without an embedding file; degrade_cfg None:
        no degradation (the vae stage), lr is then the HR crop area-downsampled x4. A share
        `clean_prob` of the items gets the clean bicubic x4 LR instead of the Real-ESRGAN one."""
        self.paths, self.size, self.default, self.degrade_cfg = paths, size, default, degrade_cfg
        self.clean_prob = clean_prob
        self.decoded, self.decoded_bytes = {}, 0    # decoded images kept per worker, up to CACHE_BYTES

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        import degrade
        i, seed = key
        path = self.paths[i]
        arr = self.decoded.get(path)
        if arr is None:
            try:
                with Image.open(path) as im:
                    arr = np.array(im.convert("RGB"))                     # (H, W, 3) uint8
            except Exception as e:  # PIL raises many types for truncated / odd files
                return dict(unreadable=path, why=str(e))   # train.py warns once per file
            if self.decoded_bytes + arr.nbytes <= CACHE_BYTES:   # small data sets: decode each file once
                self.decoded[path] = arr
                self.decoded_bytes += arr.nbytes
        g = torch.Generator().manual_seed(seed)
        hr = random_crop(torch.from_numpy(arr).permute(2, 0, 1), self.size, g)
        if self.degrade_cfg is None:
            gt, lr = hr[None], F.avg_pool2d(hr[None], 4)
        elif self.clean_prob > 0 and torch.rand((), generator=g) < self.clean_prob:
            gt, lr = hr[None], degrade.bicubic_down(hr[None], self.degrade_cfg.scale)
        else:
            gt, lr, _ = degrade.degrade(hr[None], self.degrade_cfg, generator=g)
        context, pooled = load_embedding(os.path.splitext(path)[0] + ".safetensors", self.default)
        return dict(gt=gt[0], lr=lr[0], context=context, pooled=pooled, name=path)


def load_embedding(path, null):
    """(context, pooled) from an embedding file, or the null embedding when there is none."""
    if not os.path.exists(path):
        return null
    f = SafetensorsFiles(path)
    try:
        context, pooled = f.get("context"), f.get("pooled")
    except KeyError:
        raise CheckpointError(f"{path}: an embedding file needs 'context' and 'pooled' tensors") from None
    if context.shape[-1] != null[0].shape[-1] or pooled.shape != null[1].shape:
        raise CheckpointError(f"{path}: context {tuple(context.shape)} / pooled {tuple(pooled.shape)} do not "
                              f"fit the model ({null[0].shape[-1]} / {tuple(null[1].shape)})")
    return context.float(), pooled.float()


def collate(items):
    """A batch dict; `unreadable` lists (path, why) of the items that could not be read (an
    all-unreadable batch has nothing else)."""
    unreadable = [(it["unreadable"], it["why"]) for it in items if "unreadable" in it]
    items = [it for it in items if "unreadable" not in it]
    if not items:
        return dict(unreadable=unreadable)
    L = max(it["context"].shape[0] for it in items)   # pad contexts to one length (zeros = padding)
    ctx = torch.stack([F.pad(it["context"], (0, 0, 0, L - it["context"].shape[0])) for it in items])
    return dict(gt=torch.stack([it["gt"] for it in items]), lr=torch.stack([it["lr"] for it in items]),
                context=ctx, pooled=torch.stack([it["pooled"] for it in items]),
                names=[it["name"] for it in items], unreadable=unreadable)


class StepBatches(torch.utils.data.Sampler):
    """For step k: `batch` (index, seed) keys drawn from a generator seeded by (seed, k, rank)."""

    def __init__(self, n, batch, seed, rank, start, stop):
        self.n, self.batch, self.seed, self.rank, self.start, self.stop = n, batch, seed, rank, start, stop

    def __iter__(self):
        for k in range(self.start, self.stop):
            g = torch.Generator().manual_seed(mix(self.seed, k, self.rank))
            idx = torch.randint(self.n, (self.batch,), generator=g).tolist()
            seeds = torch.randint(2 ** 62, (self.batch,), generator=g).tolist()
            yield list(zip(idx, seeds))

    def __len__(self):
        return self.stop - self.start


def mix(*xs):
    h = 0
    for x in xs:
        h = (h * 1_000_003 + int(x) + 1) % (2 ** 62)
    return h
