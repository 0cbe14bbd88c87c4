"""Command line: ``python -m pyro_vlae.evaluate RUN_DIR`` measures a trained run and writes ``eval.json`` and
``report.md`` (:func:`pyro_vlae.evaluation.pipeline.evaluate_run` does the work).

Examples::

    python -m pyro_vlae.evaluate runs/vlae_mnist_seed0_...                       # K = 50 on 1000 test images
    python -m pyro_vlae.evaluate runs/vlae_mnist_seed0_... --num-samples 5000 --max-images 0   # full test set
"""

from __future__ import annotations

import argparse
import sys

from .data import DatasetError
from .evaluation.pipeline import evaluate_run
from .training.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyro_vlae.evaluate",
        description="Evaluate a trained run: IWAE log-likelihood, per-layer KL and active units, classifier-based "
        "sample quality and probes, disentanglement (sprites, shapes3d); writes eval.json and report.md in the run "
        "folder.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding checkpoints/latest.pt")
    p.add_argument("--num-samples", type=int, default=50, help="importance samples K per image (default: 50)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="split to evaluate (default: test)")
    p.add_argument("--max-images", type=int, default=1000, help="images of the split; 0 for all (default: 1000)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass (default: 100)")
    p.add_argument("--chunk-size", type=int, help="importance samples per forward pass (default: ~1024 rows)")
    p.add_argument("--classifier-cache", help="classifier cache folder (default: <data_dir>/classifiers)")
    p.add_argument("--probe-images", type=int, default=5000, help="training images for the linear probes")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier-based metrics and probes")
    p.add_argument(
        "--disentangle-images",
        type=int,
        default=5000,
        help="test items for the disentanglement scores on datasets with factors (default: 5000)",
    )
    p.add_argument(
        "--dci",
        choices=["gbt", "lda"],
        default="gbt",
        help="DCI importances: gbt, disentanglement_lib's gradient-boosted trees (minutes on a CPU; default), or lda, "
        "a fast variant that is not comparable with published numbers",
    )
    p.add_argument("--no-diagnostics", action="store_true", help="skip the intervention and Gibbs-chain diagnostics")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    for flag in ("num_samples", "batch_size", "probe_images", "disentangle_images"):
        if getattr(args, flag) < 1:
            return _fail(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_images < 0 or (args.chunk_size is not None and args.chunk_size < 1):
        return _fail("--max-images must be >= 0 and --chunk-size >= 1")
    try:
        evaluate_run(
            args.run_dir, args.num_samples, args.split, args.max_images, args.device, batch_size=args.batch_size,
            chunk_size=args.chunk_size, classifier_cache=args.classifier_cache, probe_images=args.probe_images,
            classifier=not args.no_classifier, run_diagnostics=not args.no_diagnostics, dci_estimator=args.dci,
            disentangle_images=args.disentangle_images, seed=args.seed,
        )  # fmt: skip
    except CheckpointError as e:
        return _fail(f"{e}")
    except (DatasetError, ValueError, OSError) as e:
        return _fail(str(e))
    return 0


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
