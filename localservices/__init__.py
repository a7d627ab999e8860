"""The embedded default deployment on 127.0.0.1: Kafka (ZooKeeper + one broker), an MLflow server and the
Airflow environment of local runs. Only the command line (`ckl services`, the demo) and tests use it."""
