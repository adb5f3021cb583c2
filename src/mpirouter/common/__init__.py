"""Layer 0, plain Python: typed configs from dicts and JSON (`config`), crash-safe file writes
(`files`), where a result came from (`provenance`), the package version (`version`).

Nothing here imports the rest of mpirouter; torch is imported only to describe the machine."""
