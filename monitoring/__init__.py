"""ckl monitoring: MLflow tracking of ingestion batches, retention probes and memory snapshots."""
