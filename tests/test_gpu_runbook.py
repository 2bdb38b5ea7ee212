"""docs/gpu_runbook.md: every command of its `bash` blocks exists and accepts its arguments.

Commands of this project (`hand3d`, `vipa-train`, `vipa-serve`, `vipa-eval`, `python -m <module>`, the module
behind `accelerate launch -m`) are parsed by their own argument parser and stopped right after parsing (nothing
runs); console scripts must be declared in pyproject.toml. Named things are checked where they live: recipes
load, accelerate configs exist, Hand3D sources and environment suites are registered, LIBERO task groups
resolve, pip extras and make targets exist, the `hf download` options are the CLI's, and the `sed` that writes
the single-view recipe is run (into a temporary folder) and its output loads as that recipe.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
RUNBOOK = REPO / "docs" / "gpu_runbook.md"


def runbook_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks of `text`, one argv per line (a trailing `&` dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            argv = shlex.split(line, comments=True)
            if argv and argv[-1] == "&":
                argv = argv[:-1]
            commands.append(argv)
    return commands


class _Parsed(Exception):
    """Raised right after a command's argument parser accepted its arguments (the dry run stops there)."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def dry_parse(main, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Call `main(argv)` with `ArgumentParser.parse_args` stopping the call once parsing succeeded."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        try:
            main(argv)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            raise AssertionError(f"{argv}: rejected by the command's parser (exit {e.code})") from None
    raise AssertionError(f"{argv}: the command never parsed its arguments")


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})


def module_main(module: str):
    """The `main` a `python -m module` runs (the module must end with the usual `__main__` guard)."""
    mod = importlib.import_module(module)
    source = Path(mod.__file__).read_text()
    assert hasattr(mod, "main") and 'if __name__ == "__main__"' in source, (
        f"{module}: no main() to run with -m"
    )
    return mod.main


def check_values(ns: argparse.Namespace, created: dict[str, Path]) -> None:
    """What the parsers accept as strings but must name something real."""
    from training.common import load_recipe
    from training.stage3 import load_stage3_recipe

    if getattr(ns, "stage", None) and getattr(ns, "recipe", None):
        recipe = str(created.get(ns.recipe, ns.recipe))
        (load_stage3_recipe if ns.stage == "stage3" else load_recipe)(recipe)
    if getattr(ns, "sources", None):
        from hand3d_dataset.sources import SOURCES

        names = [entry.split(":")[0] for entry in ns.sources.split(",")]
        assert set(names) <= set(SOURCES), f"--sources: {set(names) - set(SOURCES)} are not Hand3D sources"
        assert "synth" not in names, "the paper's Hand3D is built from real sources only"
    if getattr(ns, "env", None):
        from evaluation.envs import ENVIRONMENTS, get_suite

        assert ns.env in ENVIRONMENTS, f"--env {ns.env}: not in evaluation.envs.ENVIRONMENTS"
        suite = get_suite(ns.env, image_size=ns.image_size)
        assert len(suite.resolve_tasks(ns.tasks)) == 40  # the four suites of Table 3


def test_the_runbook_parses_into_commands() -> None:
    commands = runbook_commands(RUNBOOK.read_text())
    programs = {argv[0] for argv in commands}
    assert {"hand3d", "vipa-serve", "vipa-eval", "accelerate", "hf", "make"} <= programs
    assert runbook_commands("```bash\n# c\nvipa-serve --policy x --port 1 &\n```\n```python\nx\n```") == [
        ["vipa-serve", "--policy", "x", "--port", "1"]
    ]


def test_every_runbook_command_exists_and_accepts_its_arguments(monkeypatch, tmp_path) -> None:
    scripts = console_scripts()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    created: dict[str, Path] = {}  # files the runbook writes itself (sed > FILE), written here into tmp_path
    checked = []
    for argv in runbook_commands(RUNBOOK.read_text()):
        program, args = argv[0], argv[1:]
        if program in scripts:
            module, function = scripts[program].split(":")
            ns = dry_parse(getattr(importlib.import_module(module), function), args, monkeypatch)
            check_values(ns, created)
        elif program in ("vipa-train", "vipa-serve", "vipa-eval", "hand3d", "vipa-demos"):
            raise AssertionError(f"{program}: not a console script in pyproject.toml [project.scripts]")
        elif program == "python" and args[:1] == ["-m"]:
            ns = dry_parse(module_main(args[1]), args[2:], monkeypatch)
            check_values(ns, created)
        elif program == "accelerate":
            from accelerate.commands.launch import launch_command_parser

            launch = launch_command_parser().parse_args(args[1:])
            assert args[0] == "launch" and launch.module, f"{argv}: expected accelerate launch ... -m MODULE"
            assert (REPO / launch.config_file).is_file(), f"{launch.config_file}: no such accelerate config"
            ns = dry_parse(module_main(launch.training_script), launch.training_script_args, monkeypatch)
            check_values(ns, created)
        elif program == "python3" and args[:2] == ["-m", "venv"]:
            pass
        elif program.endswith("pip") and args[:1] == ["install"]:
            for arg in args[1:]:
                extras = re.fullmatch(r"-e|\.\[(.*)\]", arg)
                if extras and extras.group(1):
                    unknown = set(extras.group(1).split(",")) - set(
                        pyproject["project"]["optional-dependencies"]
                    )
                    assert not unknown, f"pip install: unknown extras {unknown}"
                if arg.startswith("torch=="):
                    assert arg in (REPO / "constraints-cpu.txt").read_text(), f"{arg}: not the tested torch"
        elif program == "make":
            makefile = (REPO / "Makefile").read_text()
            for target in args:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), (
                    f"make {target}: no such target"
                )
        elif program == "hf":
            assert args[0] == "download"
            help_text = subprocess.run(
                [str(Path(sys.executable).parent / "hf"), "download", "--help"],
                capture_output=True,
                text=True,
                check=True,
                env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
            ).stdout
            for option in (a for a in args if a.startswith("--")):
                assert option in help_text, f"hf download: no option {option}"
        elif program == "sed":
            assert args[-2] == ">", f"{argv}: expected sed ... > FILE"
            out = subprocess.run(
                ["sed", *args[:-2]], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout
            target = tmp_path / Path(args[-1]).name
            target.write_text(out)
            created[args[-1]] = target
        else:
            raise AssertionError(f"{argv}: a command this test does not know how to check")
        checked.append(program)
    # the runbook has them all: Tables 3 (two views, one view) and 7 (three ablated rows); stages 1-3 and the ablation
    assert checked.count("vipa-eval") == 5 and checked.count("accelerate") == 8, checked


def test_single_view_recipe_keeps_the_agent_view_only(tmp_path) -> None:
    from training.stage3 import load_stage3_recipe

    (line,) = [c for c in runbook_commands(RUNBOOK.read_text()) if c[0] == "sed"]
    out = subprocess.run(["sed", *line[1:-2]], cwd=REPO, capture_output=True, text=True, check=True).stdout
    (tmp_path / "single.yaml").write_text(out)
    single = load_stage3_recipe(tmp_path / "single.yaml")
    two = load_stage3_recipe("paper-libero")
    assert single.camera_keys == ["observation.images.image"] and two.camera_keys is None
    assert {k: v for k, v in vars(single).items() if k != "camera_keys"} == {
        k: v for k, v in vars(two).items() if k != "camera_keys"
    }


@pytest.mark.parametrize(
    "bad", [["vipa-eval", "--env", "libero", "--bogus"], ["hand3d", "build", "--nope", "1"]]
)
def test_a_wrong_argument_is_caught(bad, monkeypatch) -> None:
    module, function = {"vipa-eval": "evaluation.cli:main", "hand3d": "hand3d_dataset.cli:main"}[
        bad[0]
    ].split(":")
    with pytest.raises(AssertionError, match="rejected by the command's parser"):
        dry_parse(getattr(importlib.import_module(module), function), bad[1:], monkeypatch)
