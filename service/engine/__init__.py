"""The engine process: models, tiers, per-tier queues, batching and the device (one engine per service)."""
