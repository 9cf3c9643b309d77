"""qmoe-ray: QMoE-style sub-1-bit compression of Mixture-of-Experts models, distributed on Ray."""

__version__ = "0.1.0"
