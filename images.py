"""Reading and writing images for the programs (sample.py, train.py, degrade.py): every common file
in, float RGB in [0, 1] out, and back to a file of the same kind.

    from images import load_image, save_image
    img = load_image("in.png")            # img.rgb (3, H, W) float32 in [0, 1]; img.alpha, img.gray, img.bits
    save_image("out.png", img.rgb, alpha=img.alpha, gray=img.gray, bits=img.bits, protect=["in.png"])

Pillow reads the files; what it cannot do right is done here with numpy:
- 16-bit grayscale (modes I;16*, I) is read at full precision (Pillow's convert("RGB") clips it to
  255); 32-bit float (F) is clipped to [0, 1] and written back as 16 bits.
- 16-bit colour PNG (48/64-bit RGB/RGBA): Pillow opens it as 8-bit, so it is decoded here (zlib and
  the five PNG row filters, non-interlaced files) and written here (row filter "Up").
- 16-bit colour TIFF needs the optional `tifffile` package; without it such files are refused
  rather than silently read at 8 bits.
Gray files stay gray (`gray`), transparency is kept apart (`alpha`, (1, H, W)), EXIF orientation
is applied. Every failure is an ImageError naming the file.
"""
import os
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")                # read and written
INPUT_EXTS = EXTS + (".gif", ".ppm", ".pgm", ".pbm", ".pnm")    # read only: results of these are PNG
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
           ".tif": "TIFF", ".tiff": "TIFF"}
MAX_PIXELS = 100_000_000           # refuse bigger files (a decompression bomb, or a mistake)
LUMA = (0.299, 0.587, 0.114)       # ITU-R 601, what Pillow's convert("L") uses


class ImageError(ValueError):
    """An image that cannot be read or written: the message names the file and what is wrong."""


@dataclass
class LoadedImage:
    rgb: torch.Tensor                  # (3, H, W) float32 in [0, 1]
    alpha: torch.Tensor | None         # (1, H, W) float32 in [0, 1], or None
    gray: bool                         # the file was grayscale: write it back gray
    bits: int                          # 8 or 16 bits per sample in the file
    path: str = ""
    note: str = ""                     # what the reader did that the user should know (animated GIF)

    @property
    def size(self):                    # (H, W)
        return tuple(self.rgb.shape[-2:])


# --------------------------------------------------------------------------------------------
# Reading


def load_image(path) -> LoadedImage:
    """Read any INPUT_EXTS file into float RGB in [0, 1] (+ alpha, gray flag, bit depth); of an
    animated file (GIF, WebP, TIFF pages) the first frame, said in `note`."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # MAX_PIXELS decides
            with Image.open(path) as im:
                _check_size(path, im.size)
                frames = getattr(im, "n_frames", 1)
                arr, gray, bits = _pixels(path, im)                           # (H, W, C) float32 (frame 0)
                arr = _orient(arr, im.getexif().get(0x0112, 1))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, zlib.error, struct.error) as e:  # truncated / corrupt data
        raise ImageError(f"{path}: unreadable image data ({e})") from None
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)          # (C, H, W)
    color, alpha = t[:-1] if t.shape[0] in (2, 4) else t, t[-1:] if t.shape[0] in (2, 4) else None
    rgb = color.expand(3, -1, -1).contiguous() if color.shape[0] == 1 else color.contiguous()
    note = f"animated, {frames} frames: the first is used" if frames > 1 else ""
    return LoadedImage(rgb=rgb, alpha=alpha, gray=gray, bits=bits, path=path, note=note)


def _check_size(path, size):
    W, H = size
    if W * H == 0:
        raise ImageError(f"{path}: the image has zero size ({W}x{H})")
    if W * H > MAX_PIXELS:
        raise ImageError(f"{path}: {W}x{H} = {W * H:,} pixels is above the limit of {MAX_PIXELS:,} "
                         f"(a decompression bomb?); raise images.MAX_PIXELS if the file is genuine")


def _pixels(path, im):
    """(array (H, W, C) float32 in [0, 1] with C in 1..4 (gray, gray+alpha, RGB, RGBA), gray, bits)."""
    if im.format == "PNG" and _png_header(path)[2] == 16 and im.mode not in ("I", "I;16", "I;16B"):
        return _read_png16(path)                       # 16-bit colour or gray+alpha: Pillow gives 8 bits
    if im.format == "TIFF" and im.mode in ("RGB", "RGBA") and _tiff_bits(im) == 16:
        return _read_tiff16(path)
    im.load()                                          # decode now, so truncation raises here
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        if a.min() < 0 or a.max() > 65535:
            raise ImageError(f"{path}: 32-bit integer image (values {a.min():.0f}..{a.max():.0f}) is not supported")
        return (a / 65535).astype(np.float32)[..., None], True, 16
    if mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1)[..., None], True, 16
    if mode in ("1", "L"):
        return _u8(im.convert("L"))[..., None], True, 8
    if mode in ("LA", "La"):
        return _u8(im.convert("LA")), True, 8
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return _u8(im.convert("RGBA" if has_alpha else "RGB")), False, 8
    if mode in ("RGBA", "RGBa"):
        return _u8(im.convert("RGBA")), False, 8
    try:                                               # RGB, RGBX, CMYK, YCbCr, LAB, HSV
        return _u8(im.convert("RGB")), False, 8
    except ValueError as e:
        raise ImageError(f"{path}: unsupported image mode {mode!r} ({e})") from None


def _u8(im):
    return np.asarray(im, dtype=np.float32) / 255.0


def _orient(a, orientation):
    """Apply the EXIF orientation tag (1..8) to an (H, W, C) array, as ImageOps.exif_transpose."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}
    return ops[orientation](a) if orientation in ops else a


def _tiff_bits(im):
    bits = im.tag_v2.get(258, (8,))                     # BitsPerSample
    return max(bits) if isinstance(bits, tuple) else bits


def _read_tiff16(path):
    try:
        import tifffile
    except ImportError:
        raise ImageError(f"{path}: 16-bit colour TIFF needs the tifffile package (pip install tifffile); "
                         f"Pillow would read it at 8 bits") from None
    a = tifffile.imread(path)
    if a.dtype != np.uint16 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ImageError(f"{path}: unsupported 16-bit TIFF layout {a.shape} {a.dtype}")
    return (a.astype(np.float32) / 65535), False, 16


# 16-bit PNG, decoded and encoded here (PNG specification, ISO/IEC 15948: chunks, zlib, row filters)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}               # colour type -> samples per pixel


def _png_chunks(data):
    pos = 8
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        yield kind, data[pos + 8:pos + 8 + n]
        pos += 12 + n


def _png_header(path):
    """(width, height, bit depth, colour type, interlace) from the IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ImageError(f"{path}: not a PNG file")
    W, H, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return W, H, depth, ctype, interlace


def _read_png16(path):
    W, H, _, ctype, interlace = _png_header(path)
    if interlace or ctype not in _PNG_CHANNELS:
        raise ImageError(f"{path}: interlaced or palette 16-bit PNG is not supported; save it without interlacing")
    with open(path, "rb") as f:
        data = f.read()
    idat = b"".join(body for kind, body in _png_chunks(data) if kind == b"IDAT")
    raw = zlib.decompressobj().decompress(idat)
    C = _PNG_CHANNELS[ctype]
    bpp, stride = 2 * C, 2 * C * W                     # bytes per pixel, per row
    if len(raw) < H * (stride + 1):
        raise ImageError(f"{path}: truncated PNG data ({len(raw)} of {H * (stride + 1)} bytes)")
    rows = np.frombuffer(raw, np.uint8)[:H * (stride + 1)].reshape(H, stride + 1)
    out = np.zeros((H, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(H):
        out[y] = prev = _unfilter(rows[y, 0], rows[y, 1:], prev, bpp, path)
    a = out.view(">u2").reshape(H, W, C)                # big-endian samples
    return a.astype(np.float32) / 65535, C <= 2, 16


def _unfilter(kind, line, prev, bpp, path):
    """Undo one PNG row filter (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth); uint8 arithmetic wraps."""
    if kind == 0:
        return line
    if kind == 1:
        return np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:
        return line + prev
    if kind not in (3, 4):
        raise ImageError(f"{path}: bad PNG row filter {kind}")
    # Average and Paeth depend on the reconstructed left neighbour: a scan along the row
    L, P = line.reshape(-1, bpp).astype(np.int32), prev.reshape(-1, bpp).astype(np.int32)
    r = np.zeros_like(L)
    a = c = np.zeros(bpp, np.int32)
    for x in range(L.shape[0]):
        b = P[x]
        if kind == 3:
            a = (L[x] + (a + b) // 2) & 255
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            a = (L[x] + np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))) & 255
            c = b
        r[x] = a
    return r.astype(np.uint8).reshape(-1)


def _write_png16(f, a):
    """a: (H, W, C) uint16, C in 1..4. Every row uses filter 2 (Up), which compresses smooth images well."""
    H, W, C = a.shape
    ctype = {v: k for k, v in _PNG_CHANNELS.items()}[C]
    rows = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(H, W * 2 * C)
    up = np.diff(rows, axis=0, prepend=np.zeros((1, rows.shape[1]), np.uint8))   # wraps mod 256
    raw = np.concatenate([np.full((H, 1), 2, np.uint8), up], axis=1).tobytes()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    f.write(_PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# Writing


def save_image(path, rgb, alpha=None, gray=False, bits=8, protect=()):
    """Write rgb (3, H, W) in [0, 1] (+ alpha (1, H, W)) atomically: a temporary file in the same
    folder, then a rename. gray: store one channel (ITU-R 601 luma). bits=16 is kept for PNG and
    TIFF; other formats store 8 bits. JPEG cannot hold alpha (an error).
    protect: paths that must never be written over (the inputs). Returns the path."""
    path = str(path)
    fmt = check_output(path, alpha is not None, protect)
    folder = os.path.dirname(os.path.abspath(path))
    a = _to_array(rgb, alpha, gray)                                    # (H, W, C) float in [0, 1]
    deep = bits == 16 and fmt in ("PNG", "TIFF")
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if deep:
                _write16(f, fmt, np.round(a * 65535).astype(np.uint16), path)
            else:
                u8 = np.round(a * 255).astype(np.uint8)
                im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)  # L, LA, RGB or RGBA
                if fmt == "WEBP" and im.mode in ("L", "LA"):
                    im = im.convert("RGB" if im.mode == "L" else "RGBA")    # WebP has no gray mode
                im.save(f, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        os.replace(tmp, path)
    except PermissionError:
        raise ImageError(f"{path}: cannot write there, the folder {folder} is not writable") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot write the image ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_output(path, has_alpha=False, protect=()):
    """The checks save_image makes before writing, for callers to make before any compute: a
    known extension, not an input, JPEG without alpha, an existing folder. Returns the format."""
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


def _to_array(rgb, alpha, gray):
    rgb = torch.as_tensor(rgb).detach().float().cpu()
    assert rgb.ndim == 3 and rgb.shape[0] == 3, f"rgb must be (3, H, W), got {tuple(rgb.shape)}"
    if gray:
        rgb = sum(w * c for w, c in zip(LUMA, rgb))[None]                           # (1, H, W)
    chans = [rgb] if alpha is None else [rgb, torch.as_tensor(alpha).detach().float().cpu().reshape(1, *rgb.shape[1:])]
    return torch.cat(chans).clamp(0, 1).permute(1, 2, 0).numpy()                     # (H, W, C)


def _write16(f, fmt, a, path):
    if fmt == "PNG":
        return _write_png16(f, a)
    if a.shape[2] == 1:                                                # 16-bit gray TIFF: Pillow can
        return Image.fromarray(np.ascontiguousarray(a[..., 0])).save(f, format="TIFF")
    try:
        import tifffile
    except ImportError:
        raise ImageError(f"{path}: 16-bit colour TIFF needs the tifffile package (pip install tifffile); "
                         f"or write .png") from None
    tifffile.imwrite(f, a, photometric="rgb" if a.shape[2] >= 3 else "minisblack")
