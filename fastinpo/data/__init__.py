"""The data side: preference pairs (``pickapic``: the Pick-a-Pic reader and writer), the records and batches that
flow to training (``batch``), the latent/text cache (``cache``), Inversion-DPO's reference-trajectory cache
(``trajectory_cache``) and prompt lists (``prompts``).

Layer rule (docs/ARCHITECTURE.md): imports only ``fastinpo.ops`` and ``fastinpo.config``."""
