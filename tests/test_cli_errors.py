"""Each bad input gives one clear line on stderr and exit status 2, never a traceback."""

import subprocess
import sys

import pandas as pd
import pytest

from fedlora.cli import main
from shared.data import synthetic_federation


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train, test = synthetic_federation(3, 30, 30, seed=1)
    train.to_csv(d / "train.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    test.assign(label="neutral").to_csv(d / "test_unknown.csv", index=False)
    train.head(20).to_csv(d / "small.csv", index=False)
    train.assign(store=float("nan")).to_csv(d / "train.csv", index=False)
    pd.DataFrame(columns=["text", "label"]).to_csv(d / "empty.csv", index=False)
    return d


CASES = {
    "missing file": (["--data", "{d}/nope.csv"], "data file not found"),
    "missing column": (["--data", "{d}/train.csv", "--text-column", "review"], "column 'review' not in"),
    "empty file": (["--data", "{d}/empty.csv"], "data file is empty"),
    "empty partitions": (["--data", "{d}/small.csv", "--num-clients", "40"], "no partition has at least 20 rows"),
    "partition column without values": (["--data", "{d}/train.csv", "--partition-by", "store"], "column 'store' in"),
    "unknown model": (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    "test labels unseen in training": (["--data", "{d}/train.csv", "--test-data", "{d}/test_unknown.csv"], "labels the training data lacks: neutral"),
    "unmeetable epsilon": (["--data", "{d}/train.csv", "--num-clients", "2", "--batch-size", "8", "--target-epsilon", "0.001"], "epsilon target cannot be met"),
    "bad delta": (["--data", "{d}/train.csv", "--num-clients", "2", "--batch-size", "8", "--delta", "0.5"], "must be below 1/N"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(case, files, tmp_path, capsys):
    argv, message = CASES[case]
    argv = [a.format(d=files) for a in argv]
    assert main(["simulate", "--output", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("fedlora: error")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "\n" not in lines[0]


def test_cli_process_exits_2_without_traceback(files, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora", "simulate", "--data", str(files / "nope.csv"), "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fedlora: error: data file not found")
    assert "Traceback" not in proc.stderr
