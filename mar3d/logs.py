"""What `mar3d` prints: the results and one progress bar per long job by default,
everything with ``--verbose``.

* :func:`configure` is the CLI's logging setup. Without ``--verbose`` it also filters
  the dependency chatter that says nothing to a mar3d user, each at its source: warnings
  by category *and* module, log levels of specific named loggers, Ray's own settings.
  Nothing is filtered globally, so a warning of any other module still shows.
* :func:`progress_bar` is the one progress bar of the long jobs (data preparation,
  training, evaluation, generation): in place on a terminal, a few lines otherwise, and
  inside a pipeline step (``MAR3D_EVENTS`` set) marker lines that the pipeline's launcher
  draws as its own bar (:class:`EventView`).
* :func:`captured_output` routes everything a step process writes (Python, C libraries,
  Ray workers forwarded to the driver, child processes) through one pipe, so a pipeline
  step keeps its full log in a file while only its events reach the launcher.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterator

VERBOSE_ENV = "MAR3D_VERBOSE"
EVENTS_ENV = "MAR3D_EVENTS"
STEP_LOGS_ENV = "MAR3D_STEP_LOGS"  # set by a pipeline's launcher: steps write step.log
EVENT_MARKER = "MAR3D_EVENT "
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Warnings raised by dependencies about their own internals: (category, module regex).
QUIET_WARNINGS = (
    # DeepSpeed calls c10d functions torch has deprecated (all_gather_into_tensor, ...).
    (FutureWarning, r"torch\.distributed\."),
    # kfp's local runner: "settings [cpu_limit, ...] have no effect in the local runner"
    # and "custom or non-Python base image": the pipeline declares them for clusters.
    (UserWarning, r"kfp\.local\."),
    (RuntimeWarning, r"kfp\.local\."),
)
# Named loggers whose INFO (or WARNING) records describe the library's machinery, not the job.
QUIET_LOGGERS = {
    "ray.data._internal.execution.streaming_executor": logging.WARNING,  # execution plans
    "ray.data._internal.progress": logging.ERROR,  # "progress bars disabled", progress logging
    "ray._private.worker": logging.WARNING,  # "Started a local Ray instance."
    # In Ray Train workers, at every report: "Checkpoint successfully created at ...".
    "ray.train.v2._internal.execution.storage": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..."
}
# Loggers named after their module's file path (``getLogger(__file__)``), quieted in a
# process that has imported the module: Ray Train's "Reporting training result N: ...".
QUIET_FILE_LOGGERS = {"ray.train.v2._internal.execution.context": logging.WARNING}
# The libraries' own settings for their console output, for every process a quiet
# command starts (Ray's actors run no mar3d code that could filter for them).
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per model download
    # Ray Train's dataset actor sets an option Ray Data has deprecated (exclude_resources).
    "PYTHONWARNINGS": "ignore::DeprecationWarning:ray.data._internal.execution.interfaces.execution_options",
}


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(verbose: bool = False) -> None:
    """Logging of a `mar3d` command. ``verbose`` is inherited by the processes it starts
    (pipeline steps, Ray workers) through ``MAR3D_VERBOSE``."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    logging.basicConfig(level=logging.DEBUG if is_verbose() else logging.INFO, format=LOG_FORMAT)
    quiet_dependencies()


def quiet_dependencies() -> None:
    """Filter :data:`QUIET_WARNINGS` and :data:`QUIET_LOGGERS` in this process and set
    :data:`QUIET_ENV` for the processes it starts (values already set are kept); nothing
    in a verbose command."""
    if is_verbose():
        return
    for category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for module, level in QUIET_FILE_LOGGERS.items():
        if getattr(sys.modules.get(module), "__file__", None):
            logging.getLogger(sys.modules[module].__file__).setLevel(level)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def worker_env() -> dict[str, str]:
    """The output settings of this command for a Ray worker's ``runtime_env``."""
    keys = (VERBOSE_ENV, EVENTS_ENV, *QUIET_ENV)
    return {k: os.environ[k] for k in keys if k in os.environ}


# ---------------------------------------------------------------- progress

class _LineBar:
    """A progress bar for a log: a line at each third of the total (at most one per
    ``min_seconds``; the end is the job's own result line), every ``min_seconds * 6``
    when the total is unknown."""

    PARTS = 3

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
                 stream: IO[str] | None = None, min_seconds: float = 5.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.min_seconds = stream, min_seconds
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._last = self._start - min_seconds  # the first part shows, however soon
        self._part = self._part_of(initial)

    def _part_of(self, n: int) -> int:
        return self.PARTS * n // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.set_n(self.n + n)

    def set_n(self, n: int) -> None:
        self.n = n
        now = time.monotonic()
        if now - self._last < self.min_seconds or (self.total and n >= self.total):
            return
        part = self._part_of(n)
        if part > self._part or (not self.total and now - self._last >= 6 * self.min_seconds):
            self._part, self._last = part, now
            self._write(self.line())

    def set_postfix(self, **postfix: Any) -> None:
        self.postfix = postfix

    def line(self) -> str:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        extra = "".join(f", {k}={short_value(v)}" for k, v in self.postfix.items())
        return f"  {self.desc}: {done} {self.unit}{pct}{extra}, {time.monotonic() - self._start:.0f} s"

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        pass


class _EventBar:
    """A progress bar inside a pipeline step: marker lines on stdout (at most one per
    ``min_seconds``, and the last one), drawn by the launcher's :class:`EventView`."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0,
                 min_seconds: float = 2.0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.min_seconds, self.postfix = min_seconds, {}
        self._last = 0.0
        self._sent = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.min_seconds:
            self._send()

    def set_postfix(self, **postfix: Any) -> None:
        self.postfix = {k: short_value(v) for k, v in postfix.items()}

    def _event(self) -> dict[str, Any]:
        return {"kind": "progress", "desc": self.desc, "n": self.n, "total": self.total,
                "unit": self.unit, "postfix": self.postfix}

    def _send(self) -> None:
        self._last, self._sent = time.monotonic(), self._event()
        emit_event(self._sent)

    def close(self) -> None:
        if self._sent != self._event():
            self._send()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True,
                 initial: int = 0):
    """A bar with tqdm's ``update`` / ``set_postfix`` / ``close``: tqdm on a terminal, a
    few lines in a log, events inside a pipeline step (:data:`EVENTS_ENV`)."""
    if not enabled:
        return _NoBar()
    if os.environ.get(EVENTS_ENV) == "1":
        return _EventBar(total, desc, unit, initial)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial)
    return _LineBar(total, desc, unit, initial)


def emit_event(event: dict[str, Any], stream: IO[str] | None = None) -> None:
    """One marker line (found anywhere in a line: Ray prefixes forwarded worker lines)."""
    stream = stream or sys.stdout
    stream.write(EVENT_MARKER + json.dumps(event, default=str) + "\n")
    stream.flush()


def parse_event(line: str) -> dict[str, Any] | None:
    at = line.find(EVENT_MARKER)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(EVENT_MARKER):].strip())
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def short_value(value: Any) -> str:
    """A number as a step line shows it (4 significant digits); anything else as is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class EventView:
    """The launcher's view of its steps' events: a line when a step starts and ends (its
    seconds and key result) and one progress bar per long step, in place on a terminal
    and a few lines otherwise."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.tty = stream.isatty()
        self._bar = None

    def show(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "progress":
            self._progress(event)
        elif event.get("kind") == "step":
            self._close_bar()
            self._say(step_line(event))

    def _progress(self, event: dict[str, Any]) -> None:
        desc = f"{event.get('desc', '')}"
        if self._bar is None or self._bar.desc.strip() != desc:
            self._close_bar()
            self._bar = self._new_bar(event, desc)
        self._bar.set_postfix(**(event.get("postfix") or {}))
        if self.tty:
            self._bar.update(int(event.get("n", 0)) - self._bar.n)
        else:
            self._bar.set_n(int(event.get("n", 0)))

    def _new_bar(self, event: dict[str, Any], desc: str):
        total, unit = event.get("total"), str(event.get("unit", ""))
        if self.tty:
            from tqdm import tqdm

            return tqdm(total=total, desc=f"  {desc}", unit=unit, file=self.stream, leave=False)
        return _LineBar(total, desc, unit, stream=self.stream)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._close_bar()


def step_line(event: dict[str, Any]) -> str:
    """``train vae: done in 95 s: 60 steps, loss 0.31``: one step's start or end."""
    step, state = event.get("step", "?"), event.get("state")
    if state == "start":
        return f"{step}: started" + (f", log: {event['log']}" if event.get("log") else "")
    seconds = f"{float(event.get('seconds', 0)):.0f} s"
    if state == "done":
        summary = event.get("summary")
        return f"{step}: done in {seconds}" + (f": {summary}" if summary else "")
    return f"{step}: FAILED after {seconds}; its full log: {event.get('log') or 'not written'}"


# ---------------------------------------------------------------- captured output

class LineRouter:
    """Text written by a step, cut into lines: every chunk goes to ``log`` (a file) and
    to ``echo`` (verbose), each event line to ``on_event``; keeps the last lines (for an
    error message) and lines starting with ``keep_prefix`` (a result)."""

    def __init__(self, log: IO[str] | None, echo: IO[str] | None = None,
                 on_event: Callable[[dict[str, Any], str], None] | None = None,
                 keep_lines: int = 20, keep_prefix: str | None = None):
        import collections

        self.log, self.echo, self.on_event = log, echo, on_event
        self.tail: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.keep_prefix = keep_prefix
        self.kept: str | None = None
        self._partial = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            for stream in (self.log, self.echo):
                if stream is not None:
                    stream.write(text)
                    stream.flush()
            *complete, self._partial = (self._partial + text).split("\n")
            for line in complete:
                self._line(line)
            if len(self._partial) > 65536:  # a bar redrawn with "\r" forever: no line end
                self._flush()

    def _line(self, line: str) -> None:
        event = parse_event(line) if self.on_event is not None else None
        if event is not None:
            self.on_event(event, line)
        elif self.keep_prefix and line.startswith(self.keep_prefix):
            self.kept = line
        elif line.strip():
            self.tail.append(line)

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def close(self, note: str = "") -> None:
        """Write ``note`` to the log and close it; later output (of processes the step
        started, still running) is only counted, not written anywhere."""
        with self._lock:
            self._flush()
            if self.log is not None:
                self.log.write(note)
                self.log.close()
            self.log = self.echo = self.on_event = None


@contextlib.contextmanager
def console_stream() -> Iterator[IO[str]]:
    """A stream on this process's stdout as it is now, still there while
    :func:`captured_output` redirects file descriptor 1."""
    sys.stdout.flush()
    stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    try:
        yield stream
    finally:
        stream.close()


@contextlib.contextmanager
def captured_output(sink: Callable[[str], None], drain_seconds: float = 2.0) -> Iterator[None]:
    """Send everything written to file descriptors 1 and 2 in this block (by Python, C
    code, and processes started here, which inherit them) to ``sink``, from a thread.

    Processes started in the block (a local Ray) keep the pipe open after it; the thread
    keeps draining it into ``sink`` so they never block on a full pipe."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=_pump, args=(read_fd, sink), name="step-output", daemon=True)
    reader.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # Python's own streams onto those descriptors too, in case sys.stdout was replaced.
    py_out, py_err = (open(fd, "w", buffering=1, closefd=False, encoding="utf-8",
                           errors="replace") for fd in (1, 2))
    try:
        with contextlib.redirect_stdout(py_out), contextlib.redirect_stderr(py_err):
            yield
    finally:
        py_out.close()
        py_err.close()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        reader.join(drain_seconds)


def _pump(fd: int, sink: Callable[[str], None]) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(fd, 65536):
        sink(decoder.decode(chunk))
    os.close(fd)


def open_log(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", encoding="utf-8", errors="replace")


@contextlib.contextmanager
def pipeline_output(log_path: Path, verbose: bool) -> Iterator[None]:
    """This process's stdout while it launches a pipeline's steps (kfp's local runner
    relays each step's output and its own log records there): everything goes to
    ``log_path``, and only the steps' events reach the real stdout through an
    :class:`EventView`. Steps keep their full logs (:data:`STEP_LOGS_ENV`); with
    ``verbose`` everything is shown, as the runner prints it."""
    os.environ[STEP_LOGS_ENV] = "1"
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        yield
        return
    quiet_dependencies()
    view = EventView(sys.stdout)
    root_filter = DropRootInfo("kfp")
    handlers = list(logging.getLogger().handlers)
    with open_log(log_path) as log:
        router = LineRouter(log, on_event=lambda event, line: view.show(event))
        for handler in handlers:
            handler.addFilter(root_filter)
        try:
            with contextlib.redirect_stdout(router):
                yield
        finally:
            for handler in handlers:
                handler.removeFilter(root_filter)
            router.flush()
            view.close()


class DropRootInfo(logging.Filter):
    """Drops the INFO records a package logs through the root logger (``logging.info``,
    as kfp's local runner does: no named logger to quiet), known by their source file."""

    def __init__(self, package: str):
        super().__init__()
        self.folder = f"{os.sep}{package}{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.levelno < logging.WARNING
                    and self.folder in record.pathname)
