"""What the command-line faces (multi_gpu_utils.py, the example) share: errors as one line.

Every error ends a command with one line on stderr and exit status 2; --debug shows the traceback.
"""
import argparse
import sys


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (not usage + error), like every other error of the CLI."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number_at_least(kind, minimum):
    """An argparse type: an int or float of at least `minimum`, refused with the value named."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is too small: give {minimum} or more")
        return value
    return parse


def run_reporting_errors(command, prog, debug=False):
    """command() -> its exit status; an exception -> one line on stderr and 2 (130 when interrupted).
    ValueError and OSError carry messages written for people; anything else is named by its type."""
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        known = isinstance(error, (ValueError, OSError))
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message if known else f'{type(error).__name__}: {message}'}"
              f"{'' if known else ' (--debug shows the traceback)'}", file=sys.stderr)
        return 2
