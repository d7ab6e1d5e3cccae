"""Front door of the CIResDiff bundle: Python API and the ``cirresdiff`` command line.

It drives the bundle's configs (``configs/``) and components (``custom/``); it does not
re-implement them::

    from cirresdiff_bundle import predict_followup
    result = predict_followup("initial.nii.gz", {"FVC": 2400, "Percent": 65, "Age": 70, "Sex": "Male",
                                                 "SmokingStatus": "Ex-smoker"})[0]
"""

from cirresdiff_bundle.api import predict_followup

__all__ = ["predict_followup"]
__version__ = "0.1.0"
