"""Both command lines follow one set of conventions (tools/commands/output.py): every subcommand describes what it
does, what it prints and its exit codes; commands that print results take --json; commands with a progress bar take
--no-progress; `--device ID` means a device id (repeatable) and `--group G` a group on every fleet command, while the
training commands' `--device auto|cpu|cuda` is the compute device; --verbose/--debug work after the subcommand."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import pytest

from edgecv.agent.cli import build_parser as agent_parser
from edgecv.tools.cli import build_parser as tools_parser
from edgecv.tools.commands.output import table

FLEET = ("push", "devices", "watch", "cmd", "rollback", "collect")
TARGETING = ("push", "cmd", "rollback", "collect")  # act on devices: one of --device/--group, and --wait-for-device
TRAINING = ("train", "prune", "optimize")
WITH_JSON = {"edgecv": ["push", "devices", "watch", "cmd", "rollback", "collect", "bundle inspect", "bundle verify",
                        "bundle sign", "keys generate", "keys id", "train", "prune", "optimize", "quantize"],
             "edgecv-agent": ["check-config", "bench", "rollback"]}
WITH_PROGRESS = ("train", "prune", "quantize", "optimize", "push", "collect")


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield f"{prefix}{name}", child
                yield from subcommands(child, f"{prefix}{name} ")


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def parsers() -> dict[str, dict[str, argparse.ArgumentParser]]:
    return {"edgecv": dict(subcommands(tools_parser())), "edgecv-agent": dict(subcommands(agent_parser()))}


def test_every_subcommand_of_both_clis_has_a_description_with_output_and_exit_codes() -> None:
    found = parsers()
    assert {"train", "optimize", "push", "cmd", "bundle verify", "keys id", "label"} <= set(found["edgecv"])
    assert {"run", "check-config", "bench", "demo", "init", "rollback"} <= set(found["edgecv-agent"])
    for prog, subs in found.items():
        for name, parser in subs.items():
            text = " ".join((parser.description or "").split())
            assert len(text) > 60, f"{prog} {name}: no real description"
            assert "exit status" in text.lower(), f"{prog} {name}: the description names no exit codes"


def test_commands_that_print_results_take_json_and_progress_bars_can_be_hidden() -> None:
    found = parsers()
    for prog, names in WITH_JSON.items():
        for name in names:
            assert option(found[prog][name], "--json") is not None, f"{prog} {name} has no --json"
    for name in WITH_PROGRESS:
        assert option(found["edgecv"][name], "--no-progress") is not None, f"edgecv {name} has no --no-progress"


def test_device_and_group_mean_the_same_on_every_fleet_command() -> None:
    found = parsers()["edgecv"]
    for name in FLEET:
        device, group = option(found[name], "--device"), option(found[name], "--group")
        assert device is not None and group is not None, name
        assert device.metavar == "ID" and "device id" in (device.help or ""), name
        assert group.metavar == "G", name
        assert (option(found[name], "--wait-for-device") is not None) == (name in TARGETING), name
    for name in TRAINING:
        device = option(found[name], "--device")
        assert device is not None and device.choices == ("auto", "cpu", "cuda"), name
        assert "compute device" in (device.help or "") and "not an edgecv device id" in (device.help or ""), name


@pytest.mark.parametrize("argv", [
    ["push", "b.edgecv", "--device", "a", "--device", "b"],
    ["cmd", "ping", "--device", "a", "--device", "b"],
    ["rollback", "--device", "a", "--device", "b"],
    ["devices", "--device", "a", "--device", "b"],
    ["watch", "--device", "a", "--device", "b"],
])
def test_device_is_repeatable(argv: list[str]) -> None:
    assert tools_parser().parse_args(argv).device == ["a", "b"]


def test_targets_are_one_of_device_or_group() -> None:
    with pytest.raises(SystemExit):
        tools_parser().parse_args(["push", "b.edgecv", "--device", "a", "--group", "lab"])
    with pytest.raises(SystemExit):
        tools_parser().parse_args(["push", "b.edgecv"])
    args = tools_parser().parse_args(["rollback", "--group", "lab", "--wait-for-device", "30"])
    assert args.group == "lab" and args.device == [] and args.wait_for_device == 30.0


def test_old_spellings_still_parse_with_a_deprecation_warning(capsys: pytest.CaptureFixture[str]) -> None:
    args = tools_parser().parse_args(["watch", "--device", "a", "b"])
    assert args.device == ["a", "b"]
    assert "'--device a b' is deprecated; repeat the option instead: --device a --device b" in capsys.readouterr().err
    args = tools_parser().parse_args(["cmd", "pi-1", "ping"])  # translated (and warned about) by the handler
    assert (args.name, args.legacy) == ("pi-1", "ping")


def test_cmd_usage_errors_exit_2_before_touching_the_broker(capsys: pytest.CaptureFixture[str]) -> None:
    from edgecv.tools.cli import main

    assert main(["cmd", "ping", "--broker", "127.0.0.1:1"]) == 2
    assert "Name the target devices: --device ID (repeatable) or --group G" in capsys.readouterr().err
    assert main(["cmd", "reboot", "--device", "a", "--broker", "127.0.0.1:1"]) == 2
    assert "Unknown command 'reboot'" in capsys.readouterr().err
    assert main(["cmd", "ping", "--device", "a", "--to", "1.0", "--broker", "127.0.0.1:1"]) == 2
    assert "--to applies to rollback only" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--verbose", "-v", "--debug", "--quiet", "-q"])
def test_verbosity_flags_work_before_and_after_the_subcommand(flag: str) -> None:
    dest = flag.lstrip("-")
    dest = {"v": "verbose", "q": "quiet"}.get(dest, dest)
    assert getattr(tools_parser().parse_args([flag, "keys", "id", "k.pub"]), dest) is True
    assert getattr(tools_parser().parse_args(["keys", "id", "k.pub", flag]), dest) is True
    assert getattr(tools_parser().parse_args(["keys", "id", "k.pub"]), dest) is False
    assert getattr(agent_parser().parse_args(["bench", "-b", "x", flag]), dest) is True
    assert getattr(agent_parser().parse_args([flag, "bench", "-b", "x"]), dest) is True


def test_keys_and_bundle_json(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from edgecv.tools.cli import main

    key = tmp_path / "k" / "signing.key"
    assert main(["keys", "generate", "--out", str(key), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["private_key"] == str(key) and made["public_key"] == str(key.with_suffix(".pub"))
    assert main(["keys", "id", str(key.with_suffix(".pub")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] == made["key_id"]


def test_tables_align_columns_and_show_missing_values_as_dashes() -> None:
    assert table(["DEVICE", "FPS"], [["pi-1", 9.5], ["pi-kitchen", None]]).splitlines() == [
        "DEVICE      FPS", "pi-1        9.5", "pi-kitchen  -"]
