"""The document: one pydantic model for the Kafka message, the synthetic generators and the model server."""
