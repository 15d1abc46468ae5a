"""BasicSR's own degradation code, the reference that degrade.py's tests and `bench.py degrade`
compare against. Test and bench only: `pip install --no-deps --no-build-isolation basicsr==1.4.2`.

Its source files are loaded by path: `import basicsr` pulls in torchvision (which does not import
beside torch 2.13), and the two files used need only its rgb_to_grayscale, stubbed here with
torchvision's weights.
"""
import importlib.util
import os
import sys
import types


def load(*names):
    """BasicSR modules by their path inside the package, e.g. load("data/degradations.py",
    "utils/img_process_util.py"). ImportError (with the install command) if BasicSR, OpenCV or
    SciPy is missing."""
    for dep in ("cv2", "scipy"):
        if importlib.util.find_spec(dep) is None:
            raise ImportError(f"BasicSR's degradations need {dep} (pip install -r requirements-test.txt)")
    spec = importlib.util.find_spec("basicsr")
    if spec is None:
        raise ImportError("basicsr not installed (pip install --no-deps --no-build-isolation basicsr==1.4.2)")
    root = spec.submodule_search_locations[0]
    stub = types.ModuleType("torchvision.transforms.functional_tensor")
    stub.rgb_to_grayscale = lambda img, num_output_channels=1: (  # torchvision's weights, (..., 1, H, W)
        0.2989 * img[..., 0:1, :, :] + 0.587 * img[..., 1:2, :, :] + 0.114 * img[..., 2:3, :, :])
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", stub.__name__)}
    sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                        "torchvision.transforms": types.ModuleType("torchvision.transforms"), stub.__name__: stub})
    try:
        mods = []
        for rel in names:
            s = importlib.util.spec_from_file_location("_basicsr_" + rel.replace("/", "_")[:-3], os.path.join(root, rel))
            mods.append(importlib.util.module_from_spec(s))
            s.loader.exec_module(mods[-1])
    finally:
        for k, v in saved.items():  # leave sys.modules as it was: other code may probe torchvision
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mods


def degradations():
    """(basicsr.data.degradations, basicsr.utils.img_process_util)."""
    return tuple(load("data/degradations.py", "utils/img_process_util.py"))
