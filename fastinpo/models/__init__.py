"""Model families. ``sd``: SD1.5 / SDXL pipelines from a local diffusers folder, the encoder (VAE posterior, text
embeddings), the UNet as an ``(x, t, cond) -> eps`` callable, the tiny random pipelines of tests and the demo.

Layer rule (docs/ARCHITECTURE.md): imports only ``fastinpo.data``, ``fastinpo.ops`` and ``fastinpo.config``."""
