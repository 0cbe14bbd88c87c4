"""Command-line flags to RunConfig: overrides apply only what they name; resume conflicts and forced configs."""

import dataclasses

import pytest

from pyro_vlae.cli_config import build_parser, check_weights_fit, config_from_args, forced_config, resume_conflicts
from pyro_vlae.presets import get_preset
from pyro_vlae.training.checkpoint import CheckpointError
from pyro_vlae.training.runs import build


def parse(*argv):
    args = build_parser().parse_args(list(argv))
    args.model, args.dataset = args.model or "vlae", args.dataset or "synthetic"
    return args


def test_flags_replace_only_the_fields_they_name():
    cfg = config_from_args(parse("--model", "hvae", "--latent-dims", "5,3", "--lr", "0.01"), (1, 16, 16), cuda=False)
    tiny = get_preset("tiny")
    assert cfg.preset == "tiny" and cfg.model_kind == "hvae"
    assert cfg.model.latent_dims == (5, 3) and cfg.model.num_layers == 2 and cfg.train.lr == 0.01
    assert dataclasses.replace(cfg.model, latent_dims=tiny.model.latent_dims) == tiny.model
    assert dataclasses.replace(cfg.train, lr=tiny.train.lr) == tiny.train


def test_resume_conflicts_and_forced_config():
    saved = config_from_args(parse(), (1, 16, 16), cuda=False)
    assert resume_conflicts(parse(), saved) == []
    got = resume_conflicts(parse("--model", "hvae", "--lr", "0.5", "--latent-dims", "4,4,4"), saved)
    assert any(c.startswith("--model hvae") for c in got) and any(c.startswith("--lr 0.5") for c in got)
    assert any(c.startswith("--latent-dims (4, 4, 4)") for c in got)
    forced = forced_config(parse("--lr", "0.5"), saved, cuda=False)
    assert forced.train.lr == 0.5 and forced.model == saved.model and forced.seed == saved.seed


def test_weights_that_do_not_fit_are_refused_before_anything_is_written():
    saved = config_from_args(parse(), (1, 16, 16), cuda=False)
    model, guide, _, _ = build(saved, "cpu")
    state = {"model": model.state_dict(), "guide": guide.state_dict()}
    check_weights_fit(saved, state)  # the same architecture fits
    wider = forced_config(parse("--latent-dims", "3,3,3"), saved, cuda=False)
    with pytest.raises(CheckpointError, match="start a new run"):
        check_weights_fit(wider, state)
