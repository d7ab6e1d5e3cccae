"""CIResDiff bundle components instantiated by the configs in ``configs/``.

Everything a config needs lives here so that the bundle folder is self-contained for the MONAI
model zoo and MONAI Label.
"""
