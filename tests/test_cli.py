"""Command lines: one error exit, help for every flag, usage examples keep their line breaks."""

from __future__ import annotations

import argparse

import pytest

from rt_engine.cli import EXIT_INPUT, EXIT_INTERRUPTED, cli_main
from rt_engine.errors import InputError


def _undocumented(ap: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in ap._actions if a.option_strings and a.help in (None, "")]


def test_cli_main_turns_engine_errors_into_one_line(capsys):
    @cli_main
    def bad(argv=None) -> int:
        raise InputError("no face found in photo.jpg")

    @cli_main
    def interrupted(argv=None) -> int:
        raise KeyboardInterrupt

    assert bad() == EXIT_INPUT == 2
    assert capsys.readouterr().err == "error: no face found in photo.jpg\n"
    assert interrupted() == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "error: interrupted\n"


def test_cli_main_keeps_tracebacks_of_bugs():
    @cli_main
    def buggy(argv=None) -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        buggy()


def test_every_training_flag_has_help_and_shows_its_default():
    from training.config import TrainConfig, build_parser

    ap = build_parser()
    assert _undocumented(ap) == []
    text = ap.format_help()
    assert "--w-open-img" in text and "(default: 0.0)" in text
    flags = [a for a in ap._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == len(TrainConfig.__dataclass_fields__) + 1  # + --config


@pytest.mark.parametrize("module", ["rt_engine.render", "rt_engine.serve.__main__"])
def test_render_and_serve_document_every_flag_with_defaults(module):
    import importlib

    ap = importlib.import_module(module).build_parser()
    assert _undocumented(ap) == []
    text = ap.format_help()
    assert "(default: " in text
    if module == "rt_engine.render":
        for flag in ("--noise", "--precision", "--batch-size"):
            assert flag in text


@pytest.mark.parametrize("module", ["training.config", "training.release", "training.train", "benchmarks.latency"])
def test_usage_examples_keep_their_line_breaks(module):
    import importlib

    doc = importlib.import_module(module).__doc__
    for line in doc.splitlines():
        if line.lstrip().startswith("python -m") and line.rstrip().endswith("\\"):
            break
    else:
        pytest.fail(f"{module}: no continued usage line (a lone backslash at a line end joins the lines)")
