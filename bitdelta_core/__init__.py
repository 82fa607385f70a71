"""BitDelta core: 1-bit fine-tune deltas and a multi-tenant forward over one shared base."""

__version__ = "0.1.0"
