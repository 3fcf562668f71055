"""The console shows our lines and errors; library chatter and Python warnings go to the run log
(cipo_nemo/utils/console.py)."""

from __future__ import annotations

import logging
import warnings

import pytest

from cipo_nemo.utils.console import RUN_LOG_FILE, adopt_library_loggers, attach_run_log, route_logging


@pytest.fixture
def clean_logging(monkeypatch):
    """Restore the root logger, the library loggers and the warnings capture after the test."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    libraries = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
                 for name in ("ray", "vllm", "transformers")}
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    yield
    for handler in list(root.handlers):
        if handler not in saved_handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in saved_handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(saved_level)
    logging.captureWarnings(False)
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_default_handler()
    transformers_logging.disable_propagation()
    for name, (handlers, propagate) in libraries.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).propagate = propagate


def _emit_everything():
    logging.getLogger("cipo_nemo.trainer").info("step 1 done")
    logging.getLogger("megatron.core.utils").warning("Apex is not installed; falling back to torch norms")
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers.tokenization_utils_tokenizers").warning(
        "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer")
    logging.getLogger("ray._private.authentication").warning("Token authentication is enabled for this Ray cluster")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Transformer Engine is not installed", UserWarning, stacklevel=1)
    logging.getLogger("vllm.engine").error("engine core died")


def test_console_has_our_lines_and_errors_only_and_the_run_log_has_everything(clean_logging, capsys, tmp_path):
    ray_logger = logging.getLogger("ray")  # as `import ray` leaves it: its own stderr handler, no propagation
    ray_logger.addHandler(logging.StreamHandler())
    ray_logger.propagate = False
    route_logging()
    _emit_everything()
    path = attach_run_log(tmp_path / "run")
    logging.getLogger("ray.worker").warning("after the log file exists")

    console = capsys.readouterr().err
    assert "step 1 done" in console and "engine core died" in console
    for noise in ("Apex", "clean_up_tokenization", "Token authentication", "Transformer Engine", "after the log"):
        assert noise not in console, noise
    log = path.read_text()
    assert path == tmp_path / "run" / RUN_LOG_FILE
    for line in ("step 1 done", "Apex is not installed", "Ignoring clean_up_tokenization", "Token authentication",
                 "Transformer Engine is not installed", "engine core died", "after the log file exists"):
        assert line in log, line
    import os

    assert os.environ["VLLM_CONFIGURE_LOGGING"] == "0"


def test_adopting_again_catches_a_library_configured_later(clean_logging, capsys):
    route_logging()
    late = logging.getLogger("vllm")
    late.addHandler(logging.StreamHandler())  # a library that configures itself after route_logging
    late.propagate = False
    adopt_library_loggers()
    logging.getLogger("vllm.config").warning("chunked prefill is off on CPU")
    assert "chunked prefill" not in capsys.readouterr().err


def test_warnings_reach_the_log_after_a_second_routing(clean_logging, tmp_path):
    route_logging()
    warnings.showwarning = warnings._showwarning_orig  # what a recorder (pytest's) or a library does in between
    route_logging()  # a second main() in the same process
    path = attach_run_log(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("routed twice", UserWarning, stacklevel=1)
    assert "routed twice" in path.read_text()
