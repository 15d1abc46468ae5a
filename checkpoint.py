"""Reading and writing safetensors checkpoints: shared by model.py, vae.py and the programs.

Only safetensors are read (pickled .pt/.ckpt/.bin files can run code when loaded). Files are
memory-mapped, so a full-size model is read tensor by tensor into a module built on the meta
device (`load_state_dict(assign=True)`) without a second copy in memory. Every mismatch is a
`CheckpointError` whose message names the file and lists what is missing, unexpected or misshapen.
"""
import json
import os

from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and what is wrong."""


class SafetensorsFiles:
    """The tensors of one .safetensors file, a sharded index, or a folder: names, shapes, reads.

    A folder may hold one .safetensors file or an index json; if it has a `subfolder` (e.g.
    "transformer" or "vae", the diffusers pipeline layout) that is used instead.
    `prefix`: when some keys start with it, only those are seen, with the prefix removed
    (an SD3.5 single file holds `model.diffusion_model.*` beside `first_stage_model.*`).
    """

    def __init__(self, path, subfolder=None, prefix=None):
        self.path = path
        self.handles, where, self.metadata = [], {}, {}
        for f in self._resolve(path, subfolder):
            try:
                h = safe_open(f, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
            self.handles.append(h)
            self.metadata.update(h.metadata() or {})
            where.update({k: h for k in h.keys()})
        self.prefix = prefix if prefix and any(k.startswith(prefix) for k in where) else ""
        self.where = {k[len(self.prefix):]: h for k, h in where.items() if k.startswith(self.prefix)}
        self.all_keys = list(where)

    @staticmethod
    def _resolve(path, subfolder):
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such file or folder")
        if os.path.isdir(path):
            if subfolder and os.path.isdir(os.path.join(path, subfolder)):
                return SafetensorsFiles._resolve(os.path.join(path, subfolder), None)
            index = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
            if index:
                return SafetensorsFiles._resolve(os.path.join(path, index[0]), None)
            st = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(st) != 1:
                raise CheckpointError(f"{path}: expected one .safetensors file or an index json, "
                                      f"found {st or 'none'}")
            return [os.path.join(path, st[0])]
        if path.endswith(".index.json"):
            try:
                with open(path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: not a safetensors index ({e})") from None
            return [os.path.join(os.path.dirname(path), s) for s in shards]
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: only .safetensors checkpoints are read (pickled .pt/.ckpt/"
                                  f".bin files can run code when loaded); convert it first")
        return [path]

    def __contains__(self, key):
        return key in self.where

    def keys(self):
        return list(self.where)

    def shape(self, key):
        return tuple(self.where[key].get_slice(self.prefix + key).get_shape())

    def get(self, key):
        return self.where[key].get_tensor(self.prefix + key)

    def config(self, name):
        """A JSON config stored in the metadata by this project's `save_*` functions, or {}."""
        return json.loads(self.metadata.get(name, "{}"))


def check_keys(path, expected, found, what):
    """expected/found: {key: shape}. Raise a CheckpointError that lists what differs."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshapen = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                 for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshapen:
        lines = [f"{path}: checkpoint does not match {what}"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if items:
                more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:8]) + more)
        raise CheckpointError("\n".join(lines))


def atomic_save(tensors, path, metadata):
    """save_file to a temporary name beside `path`, then rename: never a half-written file. The
    file gets the permissions of any file the user makes (0666 less the umask); safetensors alone
    writes 0600."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    mask = os.umask(0)      # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask
