"""The clinically-informed process of CIResDiff (Sec. 2.3, Fig. 1): lung-function tests condition the denoiser.

In order of the data flow:

- ``text``: the lung-function record, validated and written with one template; the tokenizer.
- ``encoder``: the text encoder (token features) and its frozen form, the denoiser's context.
- ``pretraining``: CLIP-style contrastive pre-training of the text encoder against the initial CT.
- ``fusion``: the blocks that fuse the token features into the denoiser's CT features.

Training and inference batches carry the encoded text as ``context`` through
``custom.engines.ConditionalPrepareBatch``.
"""
