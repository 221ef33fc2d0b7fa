"""Protocol defaults shared by the library and the CLI (no heavy imports here, so ``lowshot --help`` is fast)."""

DEFAULT_MODEL = "facebook/vit-msn-small"  # the MSN ViT-S/16 the product is built around
FEATURE_PRENORM = "cls-prenorm"  # MSN logistic_eval.py: CLS of the last block before the final LayerNorm
FEATURE_POSTNORM = "cls-postnorm"  # last_hidden_state[:, 0]
FEATURES = (FEATURE_PRENORM, FEATURE_POSTNORM)
DEFAULT_MAX_PIXELS = 2 * 89_478_485  # images above this are refused as decompression bombs (PIL's own error level)
DEFAULT_LAMBDA = 0.0025  # MSN README, logistic_eval.py example for 5 images per class
