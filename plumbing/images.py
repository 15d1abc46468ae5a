"""Image files (plumbing; the method sees float RGB in [0, 1]): every common file in, the same kind out,
and the files a command names. Gray stays gray, alpha apart, EXIF orientation applied, every failure an
ImageError naming the file. 16-bit gray and float files keep their bits; 16-bit colour PNG goes through
the optional pypng (without it: read at 8 bits, said in `note`), TIFF through tifffile (without: refused).
"""
import glob
import importlib.util
import os
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from plumbing.checkpoints import atomic_open

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
           ".tif": "TIFF", ".tiff": "TIFF"}
EXTS = tuple(FORMATS)                                           # read and written
INPUT_EXTS = EXTS + (".gif", ".ppm", ".pgm", ".pbm", ".pnm")    # read only: results of these are PNG
MAX_PIXELS = 100_000_000           # refuse bigger files (a decompression bomb, or a mistake)
LUMA = (0.299, 0.587, 0.114)       # ITU-R 601, what Pillow's convert("L") uses
MAX_NAMED = 20                     # training images skipped by name before a count
# zlib level 3 for PNG: most of Pillow's default level 6 compression at a fraction of its time
SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {"compress_level": 3}}


class ImageError(ValueError):
    """An image that cannot be read or written: the message names the file and what is wrong."""


@dataclass
class LoadedImage:
    rgb: torch.Tensor                  # (3, H, W) float32 in [0, 1]
    alpha: torch.Tensor | None         # (1, H, W) float32 in [0, 1], or None
    gray: bool                         # the file was grayscale: write it back gray
    bits: int                          # 8 or 16 bits per sample in the file
    note: str = ""                     # what the reader did that the user should know (animated GIF)

    @property
    def size(self):                    # (H, W)
        return tuple(self.rgb.shape[-2:])


def load_image(path) -> LoadedImage:
    """Any INPUT_EXTS file as float RGB (+ alpha, gray, bits); of an animated one the first frame."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # MAX_PIXELS decides
            with Image.open(path) as im:
                W, H = im.size
                if W * H == 0:
                    raise ImageError(f"{path}: the image has zero size ({W}x{H})")
                if W * H > MAX_PIXELS:
                    raise ImageError(f"{path}: {W}x{H} = {W * H:,} pixels is above the limit of {MAX_PIXELS:,} "
                                     f"(a decompression bomb?); raise plumbing.images.MAX_PIXELS if the file is genuine")
                frames = getattr(im, "n_frames", 1)
                deep_png = im.format == "PNG" and _png_depth(path) == 16
                arr, gray, bits = _pixels(path, im, deep_png)                 # (H, W, C) float32 (frame 0)
                arr = _orient(arr, im.getexif().get(0x0112, 1))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, zlib.error) as e:  # truncated / corrupt data
        raise ImageError(f"{path}: unreadable image data ({e})") from None
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)          # (C, H, W)
    color, alpha = (t[:-1], t[-1:]) if t.shape[0] in (2, 4) else (t, None)
    notes = [f"animated, {frames} frames: the first is used"] * (frames > 1)
    notes += ["16-bit colour PNG read at 8 bits (pip install pypng to keep all 16)"] * (deep_png and bits == 8)
    return LoadedImage(color.expand(3, -1, -1).contiguous(), alpha, gray, bits, "; ".join(notes))


def _pixels(path, im, deep_png=False):
    """(array (H, W, C) float32 in [0, 1], C: gray, gray+alpha, RGB or RGBA; gray; bits) of a frame."""
    if deep_png and im.mode not in ("I", "I;16", "I;16B") and _has_pypng():
        import png                                     # 16-bit colour or gray+alpha: Pillow gives 8 bits
        try:
            w, h, rows, info = png.Reader(filename=path).asDirect()
            a = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, info["planes"])
        except png.Error as e:
            raise ImageError(f"{path}: unreadable PNG data ({e})") from None
        return a.astype(np.float32) / 65535, info["planes"] <= 2, 16
    if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and np.max(im.tag_v2.get(258, 8)) == 16:
        a = _tifffile(path).imread(path)               # tag 258: BitsPerSample, one or one per channel
        if a.dtype != np.uint16 or a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ImageError(f"{path}: unsupported 16-bit TIFF layout {a.shape} {a.dtype}")
        return a.astype(np.float32) / 65535, False, 16
    im.load()                                          # decode now, so truncation raises here
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{path}: 32-bit integer image (values {a.min():.0f}..{a.max():.0f}) is not supported")
        return (a / 65535).astype(np.float32)[..., None], True, 16
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None], True, 16
    gray = im.mode in ("1", "L", "LA", "La")
    alpha = im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (im.mode == "P" and "transparency" in im.info)
    try:                                               # other modes (RGBX, CMYK, YCbCr, LAB, HSV) as RGB
        a = np.asarray(im.convert(("L" if gray else "RGB") + ("A" if alpha else "")), dtype=np.float32) / 255.0
    except ValueError as e:
        raise ImageError(f"{path}: unsupported image mode {im.mode!r} ({e})") from None
    return a.reshape(*a.shape[:2], -1), gray, 8


def _orient(a, orientation):
    """Apply the EXIF orientation tag (1..8) to an (H, W, C) array, as ImageOps.exif_transpose."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
           6: lambda a: np.rot90(a, -1), 7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    return ops[orientation](a) if orientation in ops else a


def save_image(path, rgb, alpha=None, gray=False, bits=8, protect=()):
    """Write rgb (3, H, W) in [0, 1] (+ alpha (1, H, W)) atomically, never over a path in `protect` (the
    inputs). gray: one channel (ITU-R 601 luma); bits=16 is kept for PNG and TIFF, others store 8."""
    path = str(path)
    fmt = check_output(path, alpha is not None, protect)
    rgb = torch.as_tensor(rgb).detach().float().cpu()
    assert rgb.ndim == 3 and rgb.shape[0] == 3, f"rgb must be (3, H, W), got {tuple(rgb.shape)}"
    if gray:
        rgb = sum(w * c for w, c in zip(LUMA, rgb))[None]                           # (1, H, W)
    if alpha is not None:
        rgb = torch.cat([rgb, torch.as_tensor(alpha).detach().float().cpu().reshape(1, *rgb.shape[1:])])
    a = rgb.clamp(0, 1).permute(1, 2, 0).numpy()                                   # (H, W, C) in [0, 1]
    try:
        with atomic_open(path) as f:
            if bits == 16 and fmt in ("PNG", "TIFF"):
                _write16(f, fmt, np.round(a * 65535).astype(np.uint16), path)
            else:
                u8 = np.round(a * 255).astype(np.uint8)
                im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)  # L, LA, RGB or RGBA
                if fmt == "WEBP" and im.mode in ("L", "LA"):
                    im = im.convert("RGB" if im.mode == "L" else "RGBA")    # WebP has no gray mode
                im.save(f, format=fmt, **SAVE_OPTIONS.get(fmt, {}))
    except PermissionError:
        raise ImageError(f"{path}: cannot write there, the folder {os.path.dirname(os.path.abspath(path))} "
                         "is not writable") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot write the image ({e})") from None


def check_output(path, has_alpha=False, protect=()):
    """save_image's checks, for callers to make before any compute; returns the format."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ImageError(f"{path}: cannot write {ext or 'a file without extension'}; use one of {', '.join(EXTS)}")
    if any(_same_file(path, p) for p in protect):
        raise ImageError(f"{path}: refusing to write over an input file")
    if has_alpha and FORMATS[ext] == "JPEG":
        raise ImageError(f"{path}: JPEG cannot store the alpha channel; use .png or .webp")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ImageError(f"{path}: the folder {folder} does not exist")
    return FORMATS[ext]


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:      # one of them does not exist yet
        return os.path.realpath(a) == os.path.realpath(b)


def _has_pypng():   # 16-bit colour files go through the optional pypng (PNG) and tifffile (TIFF)
    return importlib.util.find_spec("png") is not None


def _tifffile(path):
    try:
        import tifffile
    except ImportError:
        raise ImageError(f"{path}: 16-bit colour TIFF needs the tifffile package (pip install tifffile); "
                         f"Pillow handles 8 bits only") from None
    return tifffile


def _png_depth(path):
    """The bit depth in a PNG's IHDR chunk (byte 24 of the file)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 8


def _write16(f, fmt, a, path):
    """a: (H, W, C) uint16, C in 1..4: gray through Pillow (mode I;16), colour through pypng / tifffile."""
    H, W, C = a.shape
    if C == 1:
        Image.fromarray(np.ascontiguousarray(a[..., 0])).save(f, format=fmt)
    elif fmt == "TIFF":
        _tifffile(path).imwrite(f, a, photometric="rgb" if C >= 3 else "minisblack")
    elif not _has_pypng():
        raise ImageError(f"{path}: 16-bit colour PNG needs the pypng package (pip install pypng)")
    else:
        import png
        png.Writer(W, H, bitdepth=16, greyscale=C <= 2, alpha=C in (2, 4)).write(f, a.reshape(H, W * C))


# --------------------------------------------------------------------------------------------
# Which files: sample.py's inputs and outputs, train.py's training images


def find_inputs(specs, suffix):
    """Files, folders (their images, not recursive) and globs -> (paths, problems); each file once."""
    paths, problems, seen = [], [], set()
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(INPUT_EXTS))
            # earlier results in the same folder are not inputs again
            found = [f for f in found if not (suffix and os.path.splitext(f)[0].endswith(suffix))]
        elif any(ch in spec for ch in "*?["):
            found = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
        else:
            found = [spec] if os.path.exists(spec) else []
        if not found:
            problems.append(f"{spec}: no such file, or no images ({', '.join(INPUT_EXTS)}) there")
        for f in found:
            if os.path.realpath(f) not in seen:
                seen.add(os.path.realpath(f))
                paths.append(f)
    return paths, problems


def output_path(src, out_dir, suffix, ext, has_alpha):
    stem, src_ext = os.path.splitext(os.path.basename(src))
    ext = src_ext.lower() if ext == "auto" else "." + ext.lstrip(".").lower()
    if ext not in EXTS or (has_alpha and ext in (".jpg", ".jpeg")):
        ext = ".png"                    # read-only formats (GIF, PPM, ...), and JPEG, which has no alpha
    return os.path.join(out_dir or os.path.dirname(src), stem + suffix + ext)


def find_images(data):
    paths = []
    for root in [d for d in data.split(",") if d]:
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data {root}: no such folder")
        paths += sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                        if p.lower().endswith(EXTS))
    if not paths:
        raise SystemExit(f"error: --data {data}: no images ({', '.join(EXTS)}) found")
    return paths


def usable_images(paths, size, say=print):
    """(paths Pillow opens with a shorter side >= `size`, {the others: why}), said through `say`."""
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
        else:
            usable.append(p)
    for p, why in list(skipped.items())[:MAX_NAMED]:
        say(f"warning: skipping {p}: {why}")
    if len(skipped) > MAX_NAMED:
        say(f"warning: ... and {len(skipped) - MAX_NAMED} more images skipped")
    if not usable:
        raise SystemExit(f"error: none of the {len(paths)} images in --data is usable: {len(skipped)} skipped "
                         f"(unreadable, or smaller than the {size}x{size} crop)")
    return usable, skipped

