"""`ckl train`: train a MemoryLLM with the recipe of model/training.py on `ckl data bios`-style data.

`ckl train --preset default` reproduces the committed checkpoint model/default/ (same seed, same steps).
Biographies are drawn from the training split of pipelines/bios.py (fresh renderings every time, so the
model learns to read, not to memorise people); held-out names never occur. Runs through
`deepspeed.initialize` (one process here; the same command under the `deepspeed` launcher on GPUs).
"""

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

from pipelines import bios, filler
from runtime.paths import cache_dir

TRAIN_PEOPLE = 50_000
EXPERIMENT = "ckl-train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from model.training import DEFAULT_DS_CONFIG, PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="recipe and model shape (default: the committed default model's)")
    parser.add_argument("--out", type=Path, default=Path("model/default"),
                        help="checkpoint directory (default model/default)")
    parser.add_argument("--steps", type=int, default=None,
                        help="stop after this many more steps (default: to the end of the preset)")
    parser.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    parser.add_argument("--device", default=None, help="override the preset's device (auto, cpu, cuda:0)")
    parser.add_argument("--deepspeed-config", type=Path, default=DEFAULT_DS_CONFIG,
                        help="DeepSpeed JSON config (ZeRO stage etc.; default model/ds_config.json)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI for loss curves (default: no tracking)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


class BiosCorpus:
    """Training biographies (fresh rendering per draw) and filler paragraphs."""

    def __init__(self, seed: int, people: int = TRAIN_PEOPLE):
        self.people = bios.generate_people(people, "train", seed)

    def document(self, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
        person = rng.choice(self.people)
        return bios.biography(person, rng), [(p.question, p.answer) for p in bios.probes(person)]

    def filler(self, rng: random.Random) -> str:
        return filler.filler_paragraph(rng)


def run(args: argparse.Namespace) -> int:
    from model.training import PRESETS, load_ds_config, make_trainer, train

    config = PRESETS[args.preset]
    overrides = {k: v for k, v in (("seed", args.seed), ("device", args.device)) if v is not None}
    config = dataclasses.replace(config, **overrides)
    try:
        trainer = make_trainer(config, BiosCorpus(config.seed), args.out, args.resume,
                               load_ds_config(args.deepspeed_config), cache_dir())
    except (FileNotFoundError, ValueError) as error:
        print(f"ckl train: {error}", file=sys.stderr)
        return 2
    tracker = MlflowCurves(args.mlflow_uri, args.preset, config) if args.mlflow_uri else None
    started = time.perf_counter()
    metrics = train(trainer, args.out, args.steps, tracker.log if tracker else None)
    if tracker:
        tracker.close()
        print(f"mlflow run: {tracker.run_id} (experiment {EXPERIMENT})")
    print(f"step {trainer.step}/{config.total_steps} in {time.perf_counter() - started:.0f} s "
          f"(run total {trainer.wall_seconds:.0f} s): "
          + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    print(f"checkpoint: {args.out}")
    return 0


class MlflowCurves:
    """Loss curves of one run in the MLflow experiment `ckl-train`, logged in batches of steps."""

    def __init__(self, uri: str, preset: str, config):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = found.experiment_id if found else self.client.create_experiment(EXPERIMENT)
        run = self.client.create_run(experiment_id, run_name=f"train-{preset}-seed{config.seed}")
        self.run_id = run.info.run_id
        params = [mlflow.entities.Param(k, str(v)) for k, v in dataclasses.asdict(config).items()]
        self.client.log_batch(self.run_id, params=params)
        self.pending = []

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)
