"""A two-task DAG for tests that need a real Airflow run (`dag.test()`) without the project's DAGs."""

from airflow.sdk import dag, task


@dag(dag_id="ckl_smoke", schedule=None, catchup=False, tags=["ckl-tests"])
def ckl_smoke():
    @task
    def double(number: int) -> int:
        return 2 * number

    @task
    def check(doubled: int) -> int:
        if doubled != 42:
            raise ValueError(f"expected 42, got {doubled}")
        return doubled

    check(double(21))


smoke_dag = ckl_smoke()
