"""One place that makes a run offline and quiet: the CLI, the simulation runner and the benchmarks
call it, so a normal run shows fedlora's own output and `--verbose` the libraries' chatter."""
from __future__ import annotations

import os
import warnings


def offline_and_quiet(verbose: bool = False) -> None:
    """Never reach a model hub; unless ``verbose``, hide library progress bars, load reports,
    FutureWarnings and Opacus's repeated "optimal order" warning. Environment variables are
    set (not overwritten) so that Ray workers and Flower subprocesses inherit the same choice."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest) alpha.*")
    # transformers and datasets read their env variables once, at import: set them directly too.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _disable_tqdm()
    try:
        from datasets.utils import logging as ds_logging  # flwr-datasets' partitioners
    except ImportError:
        return
    ds_logging.disable_progress_bar()


def _disable_tqdm() -> None:
    """tqdm reads TQDM_DISABLE when it is imported; a module that imported it earlier (flwr-datasets'
    NaturalIdPartitioner prints "Generating partition_id_to_indices" with it) would still draw
    bars, so its default is switched off in this process too. A caller's own `disable=` wins."""
    from functools import partialmethod

    import tqdm

    if not getattr(tqdm.tqdm, "_fedlora_quiet", False):
        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)
        tqdm.tqdm._fedlora_quiet = True
