"""`ckl train`: train a MemoryLLM with the recipe of training/recipe.py on `ckl data bios`-style data.

`ckl train --preset default` reproduces the committed checkpoint model/default/ (same seed, same steps).
Biographies are drawn from the training split of synthetic/bios.py, or with `--preset rich` of the
free-wording stream of synthetic/rich_bios.py (fresh renderings every time, so the model learns to read,
not to memorise people); held-out names and wording never occur. Runs through
`deepspeed.initialize` (one process here; the same command under the `deepspeed` launcher on GPUs).
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from cli.argtypes import positive_int, seed_number
from model import DEFAULT_CHECKPOINT
from runtime.paths import cache_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.recipe import DEFAULT_DS_CONFIG, PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="recipe and model shape (default: the committed default model's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT,
                        help="checkpoint directory (default model/default)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="stop after this many more steps (default: to the end of the preset)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    start.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                       help="start from this checkpoint's weights and tokenizer (same shape as the preset; "
                            "a fresh optimiser and step 0) instead of the preset's start")
    parser.add_argument("--seed", type=seed_number, default=None, help="override the preset's seed")
    parser.add_argument("--device", default=None, help="override the preset's device (auto, cpu, cuda:0)")
    parser.add_argument("--deepspeed-config", type=Path, default=DEFAULT_DS_CONFIG,
                        help="DeepSpeed JSON config (ZeRO stage etc.; default training/ds_config.json)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI for loss curves (default: no tracking)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def run(args: argparse.Namespace) -> int:
    from monitoring.training_curves import EXPERIMENT, TrainingCurves
    from training.corpus import build_corpus
    from training.recipe import PRESETS, load_ds_config, make_trainer, train

    config = PRESETS[args.preset]
    init_from = str(args.init_from.resolve()) if args.init_from else None
    overrides = {k: v for k, v in (("seed", args.seed), ("device", args.device), ("init_from", init_from))
                 if v is not None}
    config = dataclasses.replace(config, **overrides)
    try:
        trainer = make_trainer(config, build_corpus(config), args.out, args.resume,
                               load_ds_config(args.deepspeed_config), cache_dir())
    except (FileNotFoundError, ValueError) as error:
        print(f"ckl train: {error}", file=sys.stderr)
        return 2
    tracker = TrainingCurves(args.mlflow_uri, args.preset, config) if args.mlflow_uri else None
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
