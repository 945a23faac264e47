"""The data side: preference pairs (``pickapic``: the one pair dataset and the Pick-a-Pic reader and writer;
``sources``: pair manifests and ``w/``/``l/`` folders), the records and batches that flow to training (``batch``), the
latent/text cache (``cache``), ``fastinpo data inspect`` (``inspection``), Inversion-DPO's reference-trajectory
cache (``trajectory_cache``) and prompt lists (``prompts``). docs/DATA.md describes the layouts.

Layer rule (docs/ARCHITECTURE.md): imports only ``fastinpo.ops`` and ``fastinpo.config``."""
