"""What every command shares: the one-line parser, range checks of numeric flags, the model flags, help texts and
the console view of the library's log."""
from __future__ import annotations

import argparse
import logging
import re
import sys

from ..errors import UnguideError, check_number


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line (the problem and the fix) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Where each numeric flag's values may lie (inclusive); an int flag not named here counts something (>= 1), a float
# flag not named here only has to be finite. Checked as the flag is parsed, so NaN or "--steps 0" never reaches a job.
INT_LOW = {"--seed": 0, "--threads": 0, "--inversion-steps": 0, "--pairs": 0}
FLOAT_RANGE = {"--guidance": (0, None), "--start-guidance": (0, None), "--eta": (0, None), "--anchor-weight": (0, None),
               "--gate-position": (0, 1), "--image-gate-position": (0, 1)}
FLOAT_ABOVE_ZERO = ("--lr", "--erase-lr", "--alpha", "--max-minutes", "--text-norm")


def _number_type(flag: str, integer: bool):
    low, high = (INT_LOW.get(flag, 1), None) if integer else FLOAT_RANGE.get(flag, (None, None))
    above = 0 if flag in FLOAT_ABOVE_ZERO else None

    def parse(text: str):
        try:
            return check_number(flag, text, low=low, high=high, integer=integer, above=above)
        except UnguideError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag} ")) from None

    parse.__name__ = "int" if integer else "float"  # argparse names the type in its messages
    return parse


def check_numbers(parser: argparse.ArgumentParser) -> None:
    """Give every int/float flag of every command its range check."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                check_numbers(sub)
        elif action.type in (int, float) and action.option_strings:
            action.type = _number_type(action.option_strings[0], action.type is int)


# core parameters whose flag is not the parameter's own name with dashes
FLAG_ALIASES = {"num_inference_steps": "--steps", "num_images_per_prompt": "--n", "run_dir": "--erasure"}


def flag_words(message: str, parser: argparse.ArgumentParser) -> str:
    """A core error names settings as Python parameters (`gate_position`); on the command line they read as the
    flags that set them (--gate-position). Names that are no flag of any command keep their backticks."""
    flags = set(FLAG_ALIASES.values())

    def collect(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)
            flags.update(action.option_strings)

    collect(parser)

    def to_flag(match: re.Match) -> str:
        flag = FLAG_ALIASES.get(match.group(1), "--" + match.group(1).replace("_", "-"))
        return flag if flag in flags else match.group(0)

    return re.sub(r"`([a-z][a-z0-9_]*)`", to_flag, message)


def add_model(p: argparse.ArgumentParser) -> None:
    from ..models.loading import DTYPES

    p.add_argument("--model", default="toyworld",
                   help="'toyworld' (embedded default), a diffusers Stable Diffusion directory, or a hub id")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="precision the model runs in (default float32); erasure keeps its trained weights in float32. "
                   "Reduced precision is for GPUs: on CPU it runs, slower (float16 much slower)")


IMAGE_POSITION_HELP = ("where the image gate's threshold sits between the concept's calibration images (0) and the "
                       "anchors' (1); default: the run's own (0.8)")
GATE_POSITION_HELP = ("where the calibrated threshold sits between the run's highest anchor score (0) and its lowest "
                      "concept-prompt score (1), on a log scale; lower catches more of the concept's unseen words and "
                      "more neighbours with them")


class ConsoleLog(logging.Handler):
    """The library logs (logger "unguide"); the command line shows its INFO lines on stdout, warnings on stderr.
    The stream is looked up at each line, so a redirected sys.stdout is honoured."""

    def emit(self, record: logging.LogRecord) -> None:
        warning = record.levelno >= logging.WARNING
        print(("unguide: " if warning else "") + self.format(record), file=sys.stderr if warning else sys.stdout,
              flush=True)


def show_library_log() -> None:
    log = logging.getLogger("unguide")
    if not any(isinstance(h, ConsoleLog) for h in log.handlers):
        log.addHandler(ConsoleLog())
        log.setLevel(logging.INFO)
        log.propagate = False
