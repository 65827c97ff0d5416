"""Deployment subcommands: `fedlora certs`, `fedlora server`, `fedlora client`, `fedlora run`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

from fedlora.flags import FIELDS, add_config_flags, add_field_flag, config_from_args
from shared.errors import FedLoraError
from shared.tasks import TASKS

APP_PACKAGES = ("fedlora", "server", "client", "shared", "simulations")


# --- certs ---------------------------------------------------------------------------

def _cmd_certs(args: argparse.Namespace) -> int:
    from shared.certs import create_certs

    made = create_certs(Path(args.out), args.server_name, args.clients, force=args.force)
    print(json.dumps(made, indent=2))
    return 0


# --- server / client -------------------------------------------------------------------

def _cmd_server(args: argparse.Namespace) -> int:
    from server.deploy import run_superlink

    return run_superlink(Path(args.certs), args.address, Path(args.state) if args.state else None,
                         Path(args.allow_keys) if args.allow_keys else None, node_auth=args.node_auth,
                         log_file=Path(args.log_file) if args.log_file else None)


def _policy_from_args(args: argparse.Namespace):
    from dataclasses import fields

    from client.policy import OwnerPolicy

    values = {}
    for f in fields(OwnerPolicy):
        value = getattr(args, "policy_" + f.name)
        if value is not None:
            values[f.name] = value
    return OwnerPolicy(**values)


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from client.policy import OwnerPolicy

    group = parser.add_argument_group("owner privacy policy (requests that break it are declined)")
    for f in fields(OwnerPolicy):
        dest = "policy_" + f.name
        if f.type in (bool, "bool"):  # the flag relaxes a requirement that is on by default
            group.add_argument(f.metadata["flag"], dest=dest, action="store_const", const=False, default=None,
                               help=f.metadata["help"])
        else:
            kind = type(f.default)
            group.add_argument(f.metadata["flag"], dest=dest, type=kind, default=None,
                               help=f"{f.metadata['help']} (default {f.default})")


def _cmd_client(args: argparse.Namespace) -> int:
    from client.agent import run_agent

    if not args.insecure and not args.root_cert:
        raise FedLoraError("--root-cert is required (the federation's CA certificate, ca.crt)")
    return run_agent(args.superlink, Path(args.root_cert) if args.root_cert else None,
                     Path(args.node_key) if args.node_key else None, Path(args.data),
                     text_column=args.text_column, label_column=args.label_column,
                     profile_column=args.profile_column, offer_column=args.offer_column,
                     prompt_column=args.prompt_column, response_column=args.response_column,
                     task=args.task, model=args.model, target_epsilon=args.target_epsilon,
                     ledger=Path(args.ledger) if args.ledger else None,
                     num_threads=args.num_threads, home=Path(args.home) if args.home else None,
                     insecure=args.insecure, validate=not args.no_validate, max_retries=args.max_retries,
                     policy=_policy_from_args(args), roster=Path(args.roster) if args.roster else None,
                     secagg_min_fraction=args.secagg_min_fraction, isolation=args.isolation, device=args.device)


# --- run -----------------------------------------------------------------------------

def app_root() -> Path:
    """The Flower App folder (pyproject.toml with [tool.flwr.app]) this fedlora was installed from."""
    import server

    root = Path(server.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise FedLoraError(f"cannot find the fedlora app's pyproject.toml next to {root}: install fedlora "
                           "from a clone with `pip install -e .` as the README says")
    return root


def stage_app(root: Path, dest: Path) -> Path:
    """A clean copy of the app to build the FAB from.

    `flwr run` rewrites a pyproject.toml that still has `[tool.flwr.federations]` (its
    legacy-config migration); a copy without that section keeps the checkout untouched
    and leaves tests, data and virtual environments out of the FAB.
    """
    dest.mkdir(parents=True, exist_ok=True)
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^\[tool\.flwr\.federations[^\n]*\n.*?(?=^\[(?!tool\.flwr\.federations)|\Z)", "", text)
    (dest / "pyproject.toml").write_text(text, encoding="utf-8")
    if (root / "README.md").is_file():
        shutil.copy2(root / "README.md", dest / "README.md")
    for package in APP_PACKAGES:
        src = root / package
        if src.is_dir():
            shutil.copytree(src, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def deploy_config(args: argparse.Namespace):
    if args.num_clients is None:
        raise FedLoraError("--num-clients is required: the number of client agents (SuperNodes) to wait for")
    if not args.test_data:
        raise FedLoraError("--test-data is required: the held-out test file on the server machine")
    if args.data:
        raise FedLoraError("--data is for simulation; in deployment each data owner passes their file to `fedlora client`")
    args.partition_by, args.partition = "", "iid"
    cfg = config_from_args(args)
    test_data = Path(args.test_data).expanduser()
    if args.check_test_data and not test_data.is_file():
        raise FedLoraError(f"test data not found: {test_data} (it must exist on the server machine; "
                           "pass --no-check-test-data if the server is another machine)")
    output = Path(cfg.output).expanduser()
    return cfg.replace(test_data=str(test_data.resolve()) if args.check_test_data else str(test_data),
                       output=str(output.resolve()) if not output.is_absolute() else str(output),
                       data="", partition_by="")


def submit_run(cfg, superlink: str, root_cert: Path | None, insecure: bool = False, stream: bool = True) -> int:
    from server.deploy import CONNECTION, write_cli_config
    from shared.flower_process import flower_bin, split_address

    split_address(superlink)
    if not insecure and (root_cert is None or not root_cert.is_file()):
        raise FedLoraError(f"--root-cert: CA certificate not found: {root_cert}")
    with tempfile.TemporaryDirectory(prefix="fedlora-run-") as tmp:
        tmp_path = Path(tmp)
        app = stage_app(app_root(), tmp_path / "app")
        home = tmp_path / "flwr-home"
        write_cli_config(home, superlink, None if insecure else root_cert)
        run_config = tmp_path / "run-config.toml"
        run_config.write_text(tomli_w.dumps(cfg.to_run_config()),
                              encoding="utf-8")
        cmd = [flower_bin("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config)]
        if stream:
            cmd.append("--stream")
        env = os.environ | {"FLWR_HOME": str(home)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

        def forward(signum, _frame):
            if proc.poll() is None:
                proc.send_signal(signum)

        old = signal.signal(signal.SIGTERM, forward)
        failed = None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if failed is None and re.search(r"❌|\[code: \d+\]|Failed to start run|Connection refused", line):
                    failed = line.strip()
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            raise
        finally:
            signal.signal(signal.SIGTERM, old)
    if rc != 0 or failed:
        raise FedLoraError(f"the run could not be submitted or failed: {failed or f'flwr run exited with {rc}'}")
    summary = Path(cfg.output) / "summary.json"
    print(json.dumps({"output": cfg.output, "summary": str(summary) if summary.is_file() else None}))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = deploy_config(args)
    return submit_run(cfg, args.superlink, Path(args.root_cert).expanduser() if args.root_cert else None,
                      insecure=args.insecure, stream=not args.no_stream)


# --- parser ---------------------------------------------------------------------------

def add_deploy_commands(sub) -> None:
    certs = sub.add_parser("certs", help="create a CA, a server certificate and SuperNode keys (quick start)")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.crt/.key and supernodes/client-N(.pub)")
    certs.add_argument("--server-name", required=True, help="DNS name or IP the client agents use to reach the server")
    certs.add_argument("--clients", type=int, required=True, help="number of SuperNode key pairs to create")
    certs.add_argument("--force", action="store_true", help="replace an existing set in --out")
    certs.set_defaults(func=_cmd_certs)

    srv = sub.add_parser("server", help="run the federation server (Flower SuperLink, TLS, node auth)")
    srv.add_argument("--certs", required=True, help="folder with ca.crt, server.crt, server.key (and supernodes/*.pub)")
    srv.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT for agents and `fedlora run` (default 0.0.0.0:9092)")
    srv.add_argument("--state", default=None, help="SuperLink database file (default ~/.fedlora/server/state.db)")
    srv.add_argument("--allow-keys", default=None, help="a SuperNode .pub key or a folder of them (default CERTS/supernodes)")
    srv.add_argument("--log-file", default=None, help="SuperLink log file (default: superlink.log next to --state)")
    srv.add_argument("--no-node-auth", dest="node_auth", action="store_false",
                     help="accept any SuperNode that trusts the CA (not recommended)")
    srv.set_defaults(func=_cmd_server)

    cli = sub.add_parser("client", help="run a data owner's client agent (Flower SuperNode) on a local file")
    cli.add_argument("--superlink", required=True, help="the server's HOST:PORT")
    cli.add_argument("--root-cert", default=None, help="the federation's CA certificate (ca.crt)")
    cli.add_argument("--node-key", default=None, help="this agent's private key (supernodes/client-N)")
    cli.add_argument("--roster", default=None,
                     help="folder of the registered owners' public keys (.pub) from the operator; secure aggregation "
                          "trusts only these (e.g. certs/supernodes)")
    cli.add_argument("--secagg-min-fraction", type=float, default=None,
                     help="refuse to unmask unless at least this fraction of the round's clients survive "
                          "(raises the protocol threshold, never lowers it)")
    cli.add_argument("--data", required=True, help="CSV, TSV, JSONL or Parquet with this owner's examples (stays here)")
    cli.add_argument("--task", default=None, choices=list(TASKS),
                     help="the task this owner joins for: the file is checked for it before joining, and the "
                          "agent declines rounds of any other task (default: the one the file's columns fit, "
                          "not enforced)")
    cli.add_argument("--model", default=None,
                     help="the model the server trains: generate checks each prompt against its context "
                          "(default: the task's model)")
    for name in ("text_column", "label_column", "profile_column", "offer_column", "prompt_column", "response_column"):
        add_field_flag(cli, name, default=FIELDS[name].default)
    cli.add_argument("--target-epsilon", type=float, default=None,
                     help="this owner's epsilon budget over all rounds; tightens the operator's, never loosens it")
    cli.add_argument("--ledger", default=None, help="epsilon ledger file (default ~/.fedlora/ledgers/ledger-<hash>.json)")
    cli.add_argument("--num-threads", type=int, default=1, help="torch threads for local training")
    cli.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where this owner trains: auto (a CUDA GPU when one is visible, else the CPU); "
                          "the server's setting is ignored")
    cli.add_argument("--home", default=None, help="working folder for the SuperNode (default ~/.fedlora/agent/<hash>)")
    cli.add_argument("--max-retries", type=int, default=None, help="give up after this many reconnection attempts")
    cli.add_argument("--isolation", choices=("process", "subprocess"), default="process",
                     help="process: one long-lived ClientApp process, the model loads once per agent; subprocess: "
                          "Flower's fresh ClientApp process per message (four a round with secure aggregation)")
    cli.add_argument("--no-validate", action="store_true", help=argparse.SUPPRESS)
    cli.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    _add_policy_flags(cli)
    cli.set_defaults(func=_cmd_client)

    run = sub.add_parser("run", help="submit a federated run to a server and stream its progress")
    add_config_flags(run)
    run.add_argument("--superlink", required=True, help="the server's HOST:PORT")
    run.add_argument("--root-cert", default=None, help="the federation's CA certificate (ca.crt)")
    run.add_argument("--no-check-test-data", dest="check_test_data", action="store_false",
                     help="--test-data is a path on another (server) machine: do not check it here")
    run.add_argument("--no-stream", action="store_true", help="submit and return without streaming the logs")
    run.add_argument("--insecure", action="store_true", help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_run)
