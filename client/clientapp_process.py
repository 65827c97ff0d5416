"""The agent's long-lived ClientApp process (SuperNode `--isolation process`).

Flower 1.41's SuperNode in its default `subprocess` isolation starts `flower-superexec`,
which launches a fresh `flwr-clientapp` for every message; secure aggregation sends four
messages a round, so each round paid Python's imports four times and a model load once.
`flwr-clientapp` itself still serves exactly one task and exits, and Flower's process
mode only stops the SuperNode from starting the SuperExec. This process takes the
SuperExec's place: it polls the SuperNode's Runtime API for ClientApp tasks (signed with
the agent's SuperExec secret, so no other local process can claim them) and runs each one
in this process with Flower's own task I/O, so imports and the model cache
(`shared.lora.cached_model`) survive from one message to the next.

What persists between messages is only what the app caches on purpose: the frozen model
and tokenizer, the owner's signing key, tokenized/frozen-layer features of the owner's
own file. Per-round state travels as before: secure-aggregation secrets in the Flower
context (pulled from and pushed back to the SuperNode with every task), the privacy
ledger on disk under its lock; every trainable tensor is overwritten from the server's
global adapter before a round trains, and Opacus' hooks are removed after it
(client/trainer.py).

It runs the ClientApp of the fedlora installed here, never code the server ships in the
run's FAB: a run for another app is answered with an error.

    python -m client.clientapp_process --runtime-api-address 127.0.0.1:PORT \
        --superexec-auth-secret-file SECRET --ready-file FILE [--log-path client.log]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # pylint: disable=E0611
from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                         SuperExecAuthHttpInterceptor)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output
from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("fedlora.client")

POLL_SECONDS = 0.25
"""Between AcquireTask calls when none is pending: a local HTTP call, against the
SuperNode's own 3 s poll of the SuperLink when it is idle."""


def note(log_path: str | None, text: str) -> None:
    """One line for the owner: stderr and the agent's client.log."""
    print(text, file=sys.stderr, flush=True)
    if log_path:
        try:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        except OSError:
            pass


def local_app_id() -> tuple[str, str] | None:
    """(fab id, version) of the fedlora installed here, from its pyproject.toml."""
    from flwr.common.config import get_metadata_from_config, get_project_config

    from fedlora.deploy_commands import app_root
    from shared.errors import FedLoraError

    try:
        return get_metadata_from_config(get_project_config(app_root()))
    except (FedLoraError, OSError, KeyError, ValueError):
        return None


class TaskRunner:
    """Runs one ClientApp task after another in this process."""

    def __init__(self, address: str, log_path: str | None):
        from client.client_app import app

        # What every training round imports (~10 s on a busy CPU), now, while the agent
        # waits to join, rather than inside round 1's stages. The model itself waits for
        # the run's config.
        import opacus  # noqa: F401
        import client.trainer  # noqa: F401 - torch
        import shared.lora  # noqa: F401 - transformers, peft

        self.address, self.log_path, self.app = address, log_path, app
        self.local = local_app_id()
        self.warned: set[str] = set()

    def _heartbeat(self, client: RuntimeHttpClient):
        """Flower's task heartbeat, except that a task the SuperNode no longer knows (the
        run was stopped) ends this task only: the stock one raises SIGINT in the process."""
        import httpx

        req = SendTaskHeartbeatRequest()

        def fn() -> bool:
            try:
                res = client.SendTaskHeartbeat(req)
            except httpx.TransportError:
                return False
            except httpx.HTTPStatusError as err:
                return err.response.status_code not in (503, 504)
            if not res.success:
                log.warning("the SuperNode dropped the current task; its reply will be refused")
            return True

        return fn

    def check_app(self, fab_id: str, fab_version: str) -> None:
        if self.local is None:
            return
        app_id, version = self.local
        if fab_id != app_id:
            raise RuntimeError(f"this agent runs {app_id}'s ClientApp; the run is for {fab_id}")
        if fab_version != version and fab_version not in self.warned:
            self.warned.add(fab_version)
            note(self.log_path, f"fedlora client: the run's app is {fab_id} {fab_version}; this agent runs the "
                                f"installed {version}")

    def run(self, token: str) -> None:
        """Flower's `run_clientapp` for one task, minus the process exit."""
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        heartbeat = HeartbeatSender(self._heartbeat(client))
        message = reply = context = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, _fab = pull_task_input(client)
            self.check_app(run.fab_id, run.fab_version)
            reply = self.app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - the server gets an error reply, the owner the log
            log.error("ClientApp raised an exception", exc_info=exc)
            details = f"{type(exc)}:<'{exc}'>"
            note(self.log_path, f"fedlora client: ClientApp task failed: {type(exc).__name__}: {exc}")
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001 - the task expired or the SuperNode went away
                log.error("Failed to push reply message", exc_info=exc)
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()


def serve(address: str, secret: bytes, ready_file: Path | None, log_path: str | None,
          poll: float = POLL_SECONDS) -> None:
    runner = TaskRunner(address, log_path)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={"/flwr.proto.Runtime/AcquireTask"})],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    ready = False
    while True:
        res = client.AcquireTask(request)
        if not ready and ready_file is not None:  # the agent restarts a crash only after this
            ready_file.write_text(str(os.getpid()), encoding="utf-8")
            ready = True
        if res.HasField("task") and res.token:
            runner.run(res.token)
        else:
            time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.clientapp_process", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--superexec-auth-secret-file", required=True, help="the secret the SuperNode was given")
    parser.add_argument("--ready-file", default=None, help="written with this process's id once it is serving")
    parser.add_argument("--log-path", default=None, help="the agent's client.log")
    args = parser.parse_args(argv)
    try:
        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    except ValueError as exc:
        print(f"fedlora client: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve(args.runtime_api_address, secret, Path(args.ready_file) if args.ready_file else None, args.log_path)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
