"""Command lines: flag types, each flag's rule of valid values, and the one-line `error:` path of every program.

Each program keeps its rules in one FLAG_RULES table beside its parser rather than in every add_argument call: the
table shows all valid values at a glance (many flags share a rule), and tests/test_flags.py fails on a flag without
a rule and tries each rule's bad value.
"""
import argparse
import errno
import functools
import hashlib
import math
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable


class UserError(Exception):
    """A mistake the user can fix; reported as one `error:` line, without a traceback."""


class DatasetError(UserError):
    """The data is missing, unreadable, too small or cannot be downloaded; the message names the folder or file."""


FAILED_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)  # a full disk or quota, a file-size limit


def write_atomic(path: str, write: Callable[[Any], None]) -> None:
    """write(f) into a temporary file beside `path`, fsync, then rename: a reader never sees half a file, and a
    write that fails (a full disk or quota) leaves whatever `path` held and raises OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError):  # torch.save's zip writer reports a failed write as "unexpected pos"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = f"the write stopped part-way; is the disk or quota full? ({first})"
            raise OSError(errno.EIO, why, path) from None
        raise


@functools.lru_cache
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str) -> str:
    """The SHA-1 of a file's content in hex, read again only when its size or modification time changes."""
    stat = os.stat(path)
    return _sha1(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


def append_line(path: str, text: str) -> None:
    """Append one line to a log file, all of it or nothing: a write that fails truncates what it added."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        data = text.encode()
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except OSError as e:
            os.ftruncate(fd, start)
            raise OSError(e.errno, e.strerror, path) from None
    finally:
        os.close(fd)


def str2bool(s: str) -> bool:
    """argparse type accepting True/False/1/0/yes/no (any case)."""
    v = str(s).strip().lower()
    if v in ("true", "1", "yes", "y"):
        return True
    if v in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True/False/1/0, got '{s}'")


def bool_or_classes(s: str) -> bool | list[int]:
    """argparse type for True/False or a comma list of class indices (0,3,7)."""
    try:
        return str2bool(s)
    except argparse.ArgumentTypeError:
        pass
    try:
        return int_list(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected True, False or class indices like 0,3,7, got '{s}'") from None


def float_list(s: str) -> list[float]:
    """argparse type for lists of numbers like `0,1,1.8,3` (a single number is a list of one)."""
    try:
        return [float(p) for p in s.strip("[]() ").replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,1,1.8, got '{s}'") from None


def int_list(s: str) -> list[int]:
    """argparse type for lists like `1,2,4,4` (also `[1,2,4,4]` and `1 2 4 4`)."""
    try:
        return [int(p) for p in s.strip("[]() ").replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,4,4, got '{s}'") from None


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass(frozen=True)
class Rule:
    """A flag's valid values: the test, the values in words (for the error line), and a value on the command
    line that breaks the rule (None: every value is valid), which tests/test_flags.py tries on every flag."""
    ok: Callable[[Any], bool]
    valid: str
    bad: str | None


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


ANY = Rule(lambda v: True, "any value", None)  # paths, titles and str2bool flags (argparse checks those)


def finite() -> Rule:
    return Rule(_finite, "a finite number", "nan")


def at_least(lo: float) -> Rule:
    return Rule(lambda v: _finite(v) and v >= lo, f">= {lo}", str(lo - 1))


def above(lo: float) -> Rule:
    return Rule(lambda v: _finite(v) and v > lo, f"> {lo}", str(lo))


def between(lo: float, hi: float, below_hi: bool = False) -> Rule:
    """[lo, hi], or [lo, hi) with below_hi."""
    if below_hi:
        return Rule(lambda v: _finite(v) and lo <= v < hi, f"in [{lo}, {hi})", str(hi))
    return Rule(lambda v: _finite(v) and lo <= v <= hi, f"in [{lo}, {hi}]", str(hi + 1))


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}", "unknown")


def unset_or(rule: Rule, unset: str) -> Rule:
    """None (the flag left out, which means `unset`) or a value the rule accepts."""
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.valid} (left out: {unset})", rule.bad)


NATIVE_OR_SIZE = Rule(lambda v: v == -1 or (_finite(v) and v >= 1), "-1 (native size) or >= 1", "0")
CLASSES_OR_BOOL = Rule(lambda v: isinstance(v, bool) or (len(v) > 0 and len(set(v)) == len(v) and min(v) >= 0),
                       "True, False or distinct class indices like 0,3,7", "-1")
FINITE_LIST = Rule(lambda v: len(v) > 0 and all(_finite(x) for x in v), "finite numbers like 0,1,1.8", "nan")
POSITIVE_LIST = Rule(lambda v: len(v) > 0 and all(_finite(m) and m >= 1 for m in v), "positive integers like 1,2,4,4",
                     "0")
def _auto_or_bool(v: Any) -> bool:
    if str(v).strip().lower() == "auto":
        return True
    try:
        str2bool(v)
        return True
    except argparse.ArgumentTypeError:
        return False


AUTO_OR_BOOL = Rule(_auto_or_bool, "auto, True or False", "maybe")
DEVICE = one_of("auto", "cuda", "cpu")
DIST_BACKEND = one_of("auto", "nccl", "gloo")
COMPILE_MODE = Rule(lambda v: v in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}", "fastest")
AMP = one_of("auto", "bf16", "fp16", "none")
COMPILE_SCOPE = one_of("whole", "regional")


def check_flags(args: argparse.Namespace, rules: dict[str, Rule]) -> None:
    """Refuse the first flag outside its valid values, naming the flag and the values (nan and inf never pass)."""
    for flag, rule in rules.items():
        value = getattr(args, flag)
        if not rule.ok(value):
            raise UserError(f"--{flag} must be {rule.valid}; got {value}")


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, ...]:
    """The flags written in argv, even those given their default value (argparse fills in a default only for
    what the namespace it parses into does not hold yet)."""
    # an append or extend flag copies the list it finds before adding to it: a list of its own marks it unset
    unset = {a.dest: [] if isinstance(a, argparse._AppendAction) else object() for a in parser._actions
             if a.dest != argparse.SUPPRESS}
    probe = argparse.Namespace(**unset)
    parser.parse_args(argv, probe)
    return tuple(sorted(name for name, value in vars(probe).items() if value is not unset[name]))


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser) -> None:
    """Parse flags and run main; a UserError (or missing file) becomes one `error:` line and exit code 2.

    In a torchrun job the line comes from the first rank that fails, whichever it is: every rank that raises the
    same agreed error, and every rank that fails only because another one left, stays silent.
    """
    parser.add_argument("--debug", type=str2bool, default=False, help="show full tracebacks instead of one-line errors")
    args = parser.parse_args()
    args.given_flags = given_flags(parser, sys.argv[1:])  # train.py compares them with a resumed run's
    try:
        main(args)
    except (UserError, FileNotFoundError) as e:
        if args.debug:
            raise
        if first_failure():
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if args.debug or e.errno not in FAILED_WRITES:
            raise
        if first_failure():
            print(f"{parser.prog}: error: could not write {e.filename or 'a file'} ({e.strerror}); the files "
                  "written before are intact", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training's own handler is installed, or after it is restored
        if args.debug:
            raise
        if first_failure():
            print(f"{parser.prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        if args.debug:
            raise
        if first_failure():
            traceback.print_exc()
        sys.exit(1)



_job_store: Any = None  # torchrun's key-value store, once distributed.setup_distributed has joined the job


def count_failures_in(store: Any) -> None:
    """Count this job's failures in `store` (None: none to join), so that only the first failing rank speaks."""
    global _job_store
    _job_store = store


def first_failure() -> bool:
    """Whether this process is the job's first to fail (always, alone; rank 0 before the job is joined)."""
    if _job_store is None:
        return int(os.environ.get("RANK", 0)) == 0
    try:
        return _job_store.add("failures", 1) == 1
    except Exception:  # the store went away with the job: say it rather than nothing
        return True
