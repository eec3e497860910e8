"""Model Manager: every round's metrics and global weights, the recommended round, signed download.

- `criteria`: what "best" means (a metric or weighted score, thresholds) and its parsers.
- `recommend`: the best round, why, the runners-up, and what came closest when none qualifies.
- `retention`: which checkpoints to keep per job, and what to evict when the store is full.
- `blobs`: the content-addressed checkpoint files.
- `signing`: the controller's Ed25519 key, the signed metadata file and its verification.
- `records`, `store`: what is known of jobs and rounds, and the SQL tables that hold it.
- `settings`: the `[registry]` section of controller.toml.
- `service`: `ModelManager`, which the daemon and the API use.

Metric names, directions and aliases come from the table in `fedsky.shared.metrics`; the rules
(ties, normalisation, retention order) are written out in docs/models.md.
"""
