"""Start-up of the `magdiff` command: the parser and `--help` import no torch, diffusers or transformers; a
command loads only what it uses."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from magdiff.cli import DATA_COMMANDS, build_parser, command_of

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "cv2", "av", "scipy")
"""Libraries that take seconds to import: none of them may load before a command runs."""

# Offline, and no bytecode writes into the package during a test.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV, timeout=120
    )


def _heavy_in(modules: list[str]) -> list[str]:
    return sorted({name.split(".")[0] for name in modules} & set(HEAVY))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return dict(action.choices)


def test_importing_the_cli_imports_no_heavy_library():
    result = _python(
        """
        import json, sys
        import magdiff, magdiff.cli, magdiff.cli_checks, magdiff.loading
        print(json.dumps(sorted(sys.modules)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert _heavy_in(json.loads(result.stdout)) == []


def test_training_and_evaluating_on_the_world_import_no_video_library():
    """The world is rendered in memory: training, the benchmark and the pipeline run where PyAV is not installed."""
    result = _python(
        """
        import json, sys
        import magdiff.training.trainer, magdiff.evaluation.world_benchmark, magdiff.pipelines, magdiff.media
        print(json.dumps("av" in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is False


def test_magdiff_help_lists_every_subcommand_and_imports_no_torch():
    """The installed console script, under ``-X importtime``: every module imported is on stderr."""
    script = Path(sys.executable).with_name("magdiff")
    command = [str(script)] if script.is_file() else ["-m", "magdiff.cli"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command, "--help"], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time")]
    assert "magdiff.cli" in imported  # the timing lines are there to be read
    assert _heavy_in(imported) == []
    names = _subcommands(build_parser())
    assert {"generate", "edit", "evaluate", "train", *DATA_COMMANDS} <= set(names)
    for name in names:
        assert f"\n    {name} " in result.stdout, f"{name} is missing from magdiff --help"


def test_every_subcommand_help_imports_no_torch():
    """``magdiff <command> --help`` (and ``magdiff evaluate <target> --help``) for every command whose code is not a
    data module's: the parser of one command does not load another's libraries."""
    commands = [name for name in _subcommands(build_parser()) if name not in DATA_COMMANDS]
    targets = list(_subcommands(_subcommands(build_parser())["evaluate"]))
    argvs = [[name, "--help"] for name in commands] + [["evaluate", target, "--help"] for target in targets]
    result = _python(
        f"""
        import contextlib, io, json, sys
        from magdiff.cli import main
        heavy = {{}}
        for argv in {argvs!r}:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv)
                except SystemExit as exit:
                    assert exit.code == 0, (argv, exit.code)
            assert "usage: magdiff" in out.getvalue(), argv
            heavy[" ".join(argv)] = sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))
        print(json.dumps(heavy))
        """
    )
    assert result.returncode == 0, result.stderr
    heavy = json.loads(result.stdout)
    assert set(heavy) == {" ".join(argv) for argv in argvs}
    assert {argv: modules for argv, modules in heavy.items() if modules} == {}


def test_the_lazy_parser_lists_what_the_whole_one_lists():
    """The data commands only listed (their modules not imported) give the same top-level help as the whole parser,
    and each one's own parser is built when it is the command."""
    whole = build_parser()
    assert build_parser("generate").format_help() == whole.format_help()
    assert build_parser("").format_help() == whole.format_help()
    for name in DATA_COMMANDS:
        assert _subcommands(build_parser(name))[name].format_help() == _subcommands(whole)[name].format_help()
        listed = _subcommands(build_parser("generate"))[name]
        assert "--manifest" not in listed.format_help()  # a placeholder: never parsed


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["generate", "--prompt", "segment-dataset"], "generate"),
        (["--help"], ""),
        ([], ""),
        (["-h", "make-shards"], "make-shards"),
        (["evaluate", "world", "--help"], "evaluate"),
    ],
)
def test_command_of(argv, command):
    assert command_of(argv) == command


def test_a_data_command_parses_through_main(tmp_path):
    """``segment-dataset``'s own parser is used when it is the command: its required option is checked."""
    with pytest.raises(SystemExit) as info:
        from magdiff.cli import main

        main(["segment-dataset", "--out", str(tmp_path / "out")])
    assert info.value.code == 2


def test_package_exports_still_import():
    import magdiff
    from magdiff import MagDiffInputError, MagDiffPipeline
    from magdiff.pipelines.pipeline_magdiff import MagDiffPipeline as Direct

    assert MagDiffPipeline is Direct
    assert issubclass(MagDiffInputError, ValueError)
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        magdiff.NotAThing  # noqa: B018
