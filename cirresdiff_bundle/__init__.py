"""Front door of the CIResDiff bundle: Python API and the ``cirresdiff`` command line.

It drives the bundle's configs (``configs/``) and components (``custom/``); it does not
re-implement them.
"""

__version__ = "0.1.0"
