"""Names that live in two places (a config Literal and the table that implements it, a CLI
choice list and the module it feeds) agree: a name added to one side only fails here, not in
a run hours later."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from rayseg import cli, config, losses, partition
from rayseg.data import pipeline, scene
from rayseg.models import minkunet, resnet2d
from rayseg.train import loop


def literal_values(cls: type, name: str) -> set[str]:
    hints = typing.get_type_hints(cls)
    assert name in {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__} has no field {name}"
    return set(typing.get_args(hints[name]))


def cli_choices(*argv: str, dest: str) -> set[str]:
    parser = cli.build_parser()
    for name in argv:  # walk down the subcommands
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subcommands.choices[name]
    return set(next(a for a in parser._actions if a.dest == dest).choices)


def test_guidance_variants():
    for field in ("loss_3d", "loss_2d"):
        assert literal_values(config.GuidanceConfig, field) == set(losses.GUIDANCE_VARIANTS) | {"none"}


def test_partition_methods():
    assert literal_values(config.PartitionConfig, "method") == set(partition.ALL_METHODS)


def test_backbones():
    assert literal_values(config.ModelConfig, "backbone_3d") == set(minkunet.ARCHITECTURES)
    assert literal_values(config.OptimConfig, "seg_backbone") == set(minkunet.ARCHITECTURES)
    assert literal_values(config.ModelConfig, "backbone_2d") == set(resnet2d.FEATURE_DIMS)
    assert literal_values(config.Pretrain2DConfig, "backbone") == set(resnet2d.FEATURE_DIMS)


def test_profiles_and_modes():
    assert literal_values(config.SyntheticConfig, "profile") == set(scene.PROFILES)
    assert cli_choices("prepare", "synthetic", dest="profile") == set(scene.PROFILES)
    assert cli_choices("stream", dest="mode") == set(pipeline.MODES)


def test_stages():
    assert not hasattr(loop, "STAGES")  # defined once, in losses.py
    assert losses.STAGES == ("cmg", "cmg_rpc", "seg")
