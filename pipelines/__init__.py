"""ckl pipelines: document schema, Kafka source/sink, ingestion steps and the `ckl` command line."""
