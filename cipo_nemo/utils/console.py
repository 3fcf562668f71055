"""What a run prints, and where the libraries' chatter goes instead: the run's log file.

The console shows cipo_nemo's own log lines (INFO and up) and any record at ERROR or above, from anyone. What the
libraries log below ERROR (Transformer Engine and Apex fallbacks, tokenizer notices, Ray's token-auth notice,
vLLM's engine lines) and Python ``warnings`` go only to ``<run.output_dir>/run.log``, which also gets the console
lines, so nothing is lost. Until the run directory is known the records wait in memory (a dry run, which writes
no run directory, drops them).

Libraries that install their own stderr handler (transformers at first use, Ray and huggingface_hub at import) are
made to hand their records to the root logger instead (:func:`adopt_library_loggers`); vLLM is told not to
configure its logging (``VLLM_CONFIGURE_LOGGING=0``) before it is imported. Ray actors (the policy and the vLLM
engine) keep their own output in Ray's session log directory (``init_ray(log_to_driver=False)``). What is written
straight to file descriptor 2 (C++ warnings, tqdm bars, a vLLM engine process that the evaluation harness starts
outside Ray and that inherits the descriptor) goes to the run log inside :func:`stderr_to_run_log`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

OWN_LOGGERS = ("cipo_nemo", "__main__")
# Loggers of libraries that attach a handler of their own (so their records skip the root logger's filter).
LIBRARY_LOGGERS = ("transformers", "ray", "vllm", "megatron", "torch", "datasets", "accelerate", "huggingface_hub")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RUN_LOG_FILE = "run.log"
_MAX_BUFFERED = 10_000  # records kept before the run directory exists (the oldest are dropped beyond)


class ConsoleFilter(logging.Filter):
    """Our own records at any level the logger lets through; others only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = any(record.name == name or record.name.startswith(name + ".") for name in OWN_LOGGERS)
        return own or record.levelno >= logging.ERROR


class _Buffer(logging.Handler):
    """Holds records until the run log exists, then hands them over."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        del self.records[:-_MAX_BUFFERED]


def route_logging(*, level: int = logging.INFO) -> None:
    """The console/run-log split of the module docstring; call once, before heavy libraries are imported."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    # Python warnings become records of the "py.warnings" logger. Off first: captureWarnings(True) is a no-op once
    # on, even if something (a second main() in one process, pytest's recorder) has since replaced showwarning.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if isinstance(handler, (_Buffer, logging.FileHandler)) or getattr(handler, "_cipo_console", False):
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console._cipo_console = True  # type: ignore[attr-defined]  # found again by a second route_logging call
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    console.addFilter(ConsoleFilter())
    root.addHandler(console)
    root.addHandler(_Buffer())
    adopt_library_loggers()


def adopt_library_loggers() -> None:
    """Library loggers lose their own console handlers and pass their records to the root logger (console filter
    and run log). Harmless to repeat; call it again after importing a library that configures itself on import."""
    with contextlib.suppress(ImportError):  # its handler comes with the import: import it first, then take it off
        import huggingface_hub.utils.logging  # noqa: F401
    for name in LIBRARY_LOGGERS:
        library_logger = logging.getLogger(name)
        for handler in list(library_logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                library_logger.removeHandler(handler)
        library_logger.propagate = True
    try:  # transformers makes its handler at first use: its own switches keep it from coming back
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def attach_run_log(output_dir: str | Path) -> Path:
    """Start ``<output_dir>/run.log`` (appended to on a resume) with every record so far; returns its path."""
    path = Path(output_dir) / RUN_LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    for handler in list(root.handlers):
        if isinstance(handler, _Buffer):
            for record in handler.records:
                file_handler.handle(record)
            root.removeHandler(handler)
    root.addHandler(file_handler)
    return path


@contextlib.contextmanager
def stderr_to_run_log(output_dir: str | Path) -> Iterator[Path]:
    """Start the run log (:func:`attach_run_log`) and, while inside, point file descriptor 2 at it: output that
    bypasses logging (C++ warnings, progress bars, child processes started inside, which keep the descriptor after)
    lands there. The console handler keeps writing to the terminal, and the terminal is back on exit, before any
    traceback is printed. Yields the run log's path."""
    path = attach_run_log(output_dir)
    console = next(h for h in logging.getLogger().handlers if getattr(h, "_cipo_console", False))
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.dup(2)
    terminal_stream = os.fdopen(os.dup(terminal), "w", buffering=1)
    previous = console.setStream(terminal_stream)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        os.close(terminal)
        console.setStream(previous)
        terminal_stream.close()
