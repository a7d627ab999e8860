-- Runs once, when the PostgreSQL volume is new: Airflow's database is POSTGRES_DB (airflow); MLflow gets
-- its own, owned by the same role (its password is the postgres_password secret).
CREATE DATABASE mlflow OWNER ckl;
