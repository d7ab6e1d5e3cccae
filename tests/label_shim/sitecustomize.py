"""Lets PyPI's torchvision import beside the CPU build of torch, for the MONAI Label server of the tests only.

Why it exists: ``monailabel`` imports ``torchvision`` at module level (``monailabel/transform/post.py``),
so the server cannot start without it. PyPI's torchvision wheels (0.28.0, pinned in
``requirements-label.txt``) are linked against the CUDA build of torch; beside the project's CPU
torch their compiled extension ``torchvision._C`` does not load, and torchvision's unguarded
``@register_fake("torchvision::nms")`` (and ``qnms``, in ``torchvision/_meta_registrations.py``) then
raises ``RuntimeError: operator torchvision::nms does not exist`` at ``import torchvision``.

What it does: it registers the two operator *schemas*, no kernels, so that those registrations
find their operators and the pure-Python part of torchvision imports. Nothing here can compute
``nms``; MONAI Label's code path that this bundle uses (bundle infer task, ``Restored``, ``Writer``)
never calls it: it only needs ``import torchvision`` to succeed. On a CUDA torch, or with a
``+cpu`` torchvision build, ``_C`` loads and defines the operators itself, and this does nothing.

How it is used: ``tests/test_monailabel.py`` puts this folder on ``PYTHONPATH`` (after the overlay
of ``requirements-label.txt``) of the ``monailabel start_server`` process alone, where Python
imports ``sitecustomize`` at start-up; the test process and the project's venv never load it.
"""

try:
    from importlib.metadata import version

    import torch

    if torch.version.cuda is None and "+cpu" not in version("torchvision"):
        _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")
        _TORCHVISION_SCHEMAS.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except Exception:  # torchvision absent, or anything else: leave the interpreter as it was
    pass
