"""A normal run hides library chatter; `--verbose` shows it (issue 9: quiet, readable output)."""
import os
import subprocess
import sys

SCRIPT = """
import sys, warnings
from tqdm import tqdm as plain_tqdm  # imported before the call, as flwr-datasets' partitioners are
from transformers.utils import logging as hf_logging
from shared.quiet import offline_and_quiet
offline_and_quiet(verbose=sys.argv[1] == "verbose")
warnings.warn("deprecated thing", FutureWarning)
warnings.warn("Optimal order is the largest alpha. Please consider expanding the range", UserWarning)
hf_logging.get_logger("transformers.modeling_utils").warning("LOAD REPORT: classifier MISSING")
from transformers.utils.logging import tqdm  # the bar behind "Loading weights"
for _ in tqdm(range(3), desc="Loading weights"):
    pass
for _ in plain_tqdm(range(3), desc="Generating partition_id_to_indices"):
    pass
"""


def _stderr(mode: str) -> str:
    # a clean environment: the CLI tests in this process have set the quiet variables already
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "TQDM_DISABLE", "PYTHONWARNINGS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=env)
    return out.stderr


def test_normal_run_hides_library_chatter():
    assert _stderr("quiet") == ""


def test_verbose_shows_it():
    err = _stderr("verbose")
    for text in ("FutureWarning", "Optimal order", "LOAD REPORT", "Loading weights", "Generating partition_id_to_indices"):
        assert text in err
