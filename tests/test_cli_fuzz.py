"""Argument lists thrown at every subcommand (hypothesis): a flag-level mistake is always one line and exit code 2.

Each generated command line is parsed, and checked the way `lora-kit` checks it before any work: the config objects
of `finetune`, the closed form of `estimate`. Nothing here loads a model or data, so a command line that must fail
fails before loading one. Any exception outside the kit's error family would be a traceback for the user."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lora_kit.cli import SUBCOMMANDS, UsageError, build_parser, estimate_args, finetune_config
from lora_kit.core import LoraKitError

PARSER = build_parser()  # every subcommand's arguments


def flags(command):
    "`(option, takes a value, choices)` of each option of `command`'s parser."
    sub = next(a for a in PARSER._actions if a.dest == "command").choices[command]
    return [(a.option_strings[-1], a.nargs != 0, a.choices) for a in sub._actions if a.option_strings and a.dest != "help"]


numbers = st.one_of(st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -1, 1, 0.5, 1.0, 65535, 65536, 2**63]))
values = st.one_of(numbers.map(str), st.text(max_size=12), st.sampled_from(["", "nan", "inf", "-inf", "1e400", "0x10", "all-linear"]))


@st.composite
def command_lines(draw):
    command = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    argv = [command]
    for option, takes_value, choices in draw(st.lists(st.sampled_from(flags(command)), max_size=6)):
        argv.append(option)
        if takes_value: argv.append(draw(st.sampled_from(choices) if choices and draw(st.booleans()) else values))
    return argv


def check(argv):
    "What `lora-kit` does with `argv` before any work: parse, then build and check the settings."
    args = build_parser([argv[0]]).parse_args(argv)
    if args.command == "finetune": finetune_config(args)
    if args.command == "estimate": estimate_args(args)
    return args


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_flag_level_errors_are_one_line_never_a_traceback(argv):
    try: check(argv)
    except LoraKitError as e:  # main() prints it on one line and returns 2
        assert str(e).strip() and "Traceback" not in str(e)
    except SystemExit as e:  # only --help/-h make argparse exit, with 0
        pytest.fail(f"argparse exited with {e.code} on {argv}")


@pytest.mark.parametrize("argv", [["finetune", "--epochs", "inf"], ["estimate", "--seq-len", "1e400"],
                                  ["generate", "--adapter", "a", "--prompt", "p", "--temperature", "inf"],
                                  ["finetune", "--alpha", "-inf"], ["app", "--port", "2**63"]])
def test_the_edges_found_by_fuzzing_stay_fixed(argv):
    with pytest.raises(UsageError): check(argv)
