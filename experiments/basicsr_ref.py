"""BasicSR's own code as a reference: its degradations for degrade.py's tests and `bench.py degrade`,
its NIQE for metrics.py's. Test and bench only: `pip install --no-deps --no-build-isolation basicsr==1.4.2`.

Its source files are loaded by path: `import basicsr` pulls in torchvision (which does not import
beside torch 2.13). The degradation files need only its rgb_to_grayscale, stubbed here with
torchvision's weights; niqe.py's own `basicsr.*` imports are served by the few files they name.
"""
import importlib.util
import os
import sys
import types


def load(*names, packages=None):
    """BasicSR modules by their path inside the package, e.g. load("data/degradations.py",
    "utils/img_process_util.py"). `packages` ({dotted name: {attribute: path}}) stands in for the
    `basicsr.*` modules those files import. ImportError (with the install command) if BasicSR,
    OpenCV or SciPy is missing."""
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
    packages = packages or {}
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", stub.__name__, *packages)}
    sys.modules.update({"torchvision": types.ModuleType("torchvision"),
                        "torchvision.transforms": types.ModuleType("torchvision.transforms"), stub.__name__: stub})
    try:
        for name, attrs in packages.items():    # parents first: "basicsr", then "basicsr.utils", ...
            pkg = sys.modules[name] = types.ModuleType(name)
            for attr, rel in attrs.items():
                setattr(pkg, attr, getattr(_by_path(root, rel), attr))
        mods = [_by_path(root, rel) for rel in names]
    finally:
        for k, v in saved.items():  # leave sys.modules as it was: other code may probe torchvision
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mods


def _by_path(root, rel):
    s = importlib.util.spec_from_file_location("_basicsr_" + rel.replace("/", "_")[:-3], os.path.join(root, rel))
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


def niqe():
    """basicsr.metrics.niqe.calculate_niqe(img, crop_border, input_order="HWC", convert_to="y"): img
    in [0, 255], BGR."""
    packages = {"basicsr": {}, "basicsr.utils": {"bgr2ycbcr": "utils/color_util.py"},
                "basicsr.utils.matlab_functions": {"imresize": "utils/matlab_functions.py"},
                "basicsr.utils.registry": {"METRIC_REGISTRY": "utils/registry.py"}, "basicsr.metrics": {},
                "basicsr.metrics.metric_util": {"reorder_image": "metrics/metric_util.py",
                                                "to_y_channel": "metrics/metric_util.py"}}
    return load("metrics/niqe.py", packages=packages)[0].calculate_niqe


def degradations():
    """(basicsr.data.degradations, basicsr.utils.img_process_util)."""
    return tuple(load("data/degradations.py", "utils/img_process_util.py"))
