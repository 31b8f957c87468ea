"""lmoe_jax: Logit Mixture Outlier Exposure and the OE family for fine-grained OOD detection."""

__version__ = "0.1.0"
