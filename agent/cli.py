"""The `device-agent` commands of docs/INTERFACE.md; maps errors to exit codes (0, 78 config, 1 other).

Each command's module is imported only when that command runs, so `check-config` and `status`
start fast on a Pi and `watch` does not pay for msal or luma.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.errors import AgentError, ConfigError

if TYPE_CHECKING:      # imported in build_parser: `run` starts without argparse (_service_args)
    import argparse

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; systemd's RestartPreventExitStatus uses it


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from agent.cmdline import Parser

    p = Parser(prog="device-agent",  # usage mistakes: exit 78 (agent.cmdline), not argparse's 2
               description="Device-code sign-in and durable telemetry for headless devices.")
    p.add_argument("--version", action="version", version=f"device-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", metavar="PATH",
                        help="config file (default: $DEVICE_AGENT_CONFIG, else /etc/device-agent/config.toml)")
        return sp

    with_config(sub.add_parser("run", help="run the agent (the systemd service)"))
    demo = sub.add_parser("demo", help="the whole agent on simulated hardware and services; nothing to configure")
    demo.add_argument("--auto-approve", type=float, metavar="S", default=None,
                      help="approve the sign-in automatically after S seconds")
    demo.add_argument("--duration", type=float, metavar="S", default=None, help="stop after S seconds")
    demo.add_argument("--display", choices=("console", "png", "none"), default="console",
                      help="where to draw the panel (default: console)")
    demo.add_argument("--flow", choices=("device_code", "client_certificate"), default="device_code",
                      help="sign in with a code (default), or as an app with a throwaway certificate")
    with_config(sub.add_parser("check-config", help="validate and print the effective config"))
    st = with_config(sub.add_parser("status", help="sign-in state, account, outbox, last upload"))
    st.add_argument("--json", action="store_true", help="machine-readable output")
    with_config(sub.add_parser("sign-out", help="forget the cached account and tokens"))
    dl = sub.add_parser("dead-letter", help="readings the far side refused: list, retry, purge")
    dl_sub = dl.add_subparsers(dest="dl_action", required=True, metavar="ACTION")
    with_config(dl_sub.add_parser("list", help="dead-lettered readings (seq, when, reason) and drop counts"))
    dl_retry = with_config(dl_sub.add_parser("retry", help="queue them again with their seq and id"))
    dl_retry.add_argument("--all", action="store_true", help="every dead-lettered reading of this device")
    dl_retry.add_argument("seqs", nargs="*", metavar="SEQ", help="seq numbers from `dead-letter list`")
    with_config(dl_sub.add_parser("purge", help="delete them (counted as dropped)"))

    w = sub.add_parser("watch", help="admin view: every device's code and status from the broker")
    w.add_argument("--url", required=True, help="mqtt://host:port or mqtts://host:port")
    w.add_argument("--prefix", default="device-agent", help="topic prefix (default: device-agent)")
    w.add_argument("--ca-file", default="", help="PEM CA bundle for mqtts://")
    w.add_argument("--username", default="")
    w.add_argument("--password-file", default="")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # tests/bench: stop after N
    w.add_argument("--timeout", type=float, default=None, help="stop after S seconds")
    w.add_argument("--summary", action="store_true",
                   help="counts by state and the devices needing a person, redrawn in place")
    w.add_argument("--serve", metavar="HOST:PORT", default=None,
                   help="serve a live web page of the fleet (loopback only without a password file)")
    w.add_argument("--serve-password-file", metavar="PATH", default="",
                   help="HTTP basic-auth password for --serve (required off loopback)")
    w.add_argument("--backlog-threshold", metavar="S", type=float, default=3600.0,
                   help="a device whose oldest unsent reading is older needs attention (default 3600)")
    w.add_argument("--allow-insecure", action="store_true",
                   help="allow mqtt:// (no TLS) to a host that is not loopback: codes travel in clear")
    w.add_argument("--legacy-qos1", action="store_true", help=argparse.SUPPRESS)  # bench baseline

    with_config(sub.add_parser("mqtt-forget", help="clear this device's retained topics from the broker "
                                                   "(status, code, Home Assistant discovery)"))

    sim = sub.add_parser("sim", help="run a simulated service standalone (loopback only)")
    sim.add_argument("service", choices=("idp", "api"))
    sim.add_argument("args", nargs=argparse.REMAINDER, help="options of the simulated service (--help)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        _forget_closed_output()


def _forget_closed_output() -> None:
    """`device-agent demo 2>&1 | head -2`: the reader is gone. Python's own flush at exit would
    then fail and turn the exit code into 120; what is left unwritten goes to /dev/null."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def _service_args(argv: Sequence[str]) -> SimpleNamespace | None:
    """``run``, ``run --config PATH`` or ``run --config=PATH``, as the parser would read them.

    The command a box runs at every boot: building the parser of every command (argparse, its
    translations, twelve subparsers) costs ~15 ms of CPU (x86) before the code can reach the
    panel. Anything else (options, abbreviations, mistakes, --help) goes to the parser, so its
    answers and error lines stay exactly the parser's.
    """
    if not argv or argv[0] != "run":
        return None
    rest = list(argv[1:])
    if not rest:
        return SimpleNamespace(command="run", config=None)
    if len(rest) == 2 and rest[0] == "--config" and not rest[1].startswith("-"):
        return SimpleNamespace(command="run", config=rest[1])
    if len(rest) == 1 and rest[0].startswith("--config="):
        return SimpleNamespace(command="run", config=rest[0][len("--config="):])
    return None


def _main(argv: Sequence[str] | None) -> int:
    args = _service_args(sys.argv[1:] if argv is None else argv) or build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except AgentError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as err:
        # A user's mistake as often as not (permissions on the state dir, a port in use): one line.
        where = f"{err.filename}: " if err.filename else ""
        hint = ("; run as root or as the service user (device-agent), or fix the ownership"
                if isinstance(err, PermissionError) else "")
        print(f"error: {where}{err.strerror or err}{hint}", file=sys.stderr)
        return EXIT_FAILURE


def _check_certificate(settings: Any) -> None:
    """check-config for auth.flow = "client_certificate": the key must belong to the certificate,
    and the certificate must be valid now (else exit 78); one expiring soon is a warning.

    "Now" is the local clock. A box without an RTC may boot with a wrong one: while the kernel
    says the clock is not synchronized, an expired / not-yet-valid verdict is only a warning
    (``run`` judges with the sign-in service's time then, agent/clock.py).
    """
    from datetime import UTC, datetime

    from agent import clock
    from agent.signin.certificate import CredentialError, load_credential, validity_problem

    a = settings.auth
    try:
        cred = load_credential(a.certificate_file, a.private_key_file)
    except CredentialError as err:
        raise ConfigError(f"{settings.path}: {err}") from err
    now = datetime.now(UTC)
    problem = validity_problem(cred, now)
    if problem is not None and problem.kind != "pending":
        if now >= cred.not_after:
            what = (f"the certificate expired on {cred.not_after:%Y-%m-%d %H:%M} UTC (local clock); "
                    "create a new one and upload it to the app registration (README)")
        else:
            what = (f"the certificate is not valid before {cred.not_before:%Y-%m-%d %H:%M} UTC (local "
                    "clock); check the device clock, or use a certificate valid now")
        if clock.kernel_synchronized():
            raise ConfigError(f"{settings.path}: auth.certificate_file: {what}")
        print(f"warning: {settings.path}: auth.certificate_file: {what}; the clock is not "
              "synchronized, so run will judge by the sign-in service's time", file=sys.stderr)
        problem = None
    print(f"certificate {cred.thumbprint} (SHA-1, as the Entra portal lists it), valid until "
          f"{cred.not_after:%Y-%m-%d %H:%M} UTC", file=sys.stderr)
    if problem is not None:
        print(f"warning: {problem.message}", file=sys.stderr)


def _run(args: argparse.Namespace | SimpleNamespace) -> int:
    """`device-agent run`: the service, as fast as possible to a code on the panel."""
    import gc

    # Start-up makes ~50,000 objects that all live on (modules, classes, functions) and hardly
    # any garbage: the cyclic collector would walk them again and again, 10-20 % of the CPU to
    # the code on the panel. Paused from here; the service resumes it once the code is drawn
    # (agent.service.Service._resume_gc; docs/PERFORMANCE.md "Sign-in").
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        # SIGTERM may come while the heavy imports below still run (systemd stopping a box that
        # is still booting): catch it now so that it still means "exit 0", not death by signal.
        import signal

        from agent.signal_relay import relay_signals
        from agent.wakeup import Signal

        stop = Signal()        # agent.wakeup: every wait in the service wakes on it at once
        # The process exits after `run`: a stop signal still arriving then is ignored.
        restore = relay_signals((signal.SIGTERM, signal.SIGINT), lambda _signum: stop.set(),
                                ignore_after=True)
        try:
            from agent import config

            settings = config.load(config.config_path(args.config))
            from agent import service

            return service.run_service(settings, stop_event=stop, gc_paused=gc_was_on)
        finally:
            restore()
    finally:
        if gc_was_on and not gc.isenabled():
            gc.enable()


def _dispatch(args: argparse.Namespace | SimpleNamespace) -> int:
    cmd = args.command
    if cmd == "run":
        return _run(args)
    from agent import config

    if cmd == "check-config":
        settings = config.load(config.config_path(args.config))
        if settings.auth.flow == "client_certificate":
            _check_certificate(settings)
        print(json.dumps(config.masked(settings), indent=2, ensure_ascii=False))
        if settings.auth.dropped_scopes:
            print(f"warning: {settings.path}: auth.scopes: {', '.join(settings.auth.dropped_scopes)} "
                  f"dropped: msal requests them itself; effective scopes: "
                  f"{' '.join(settings.auth.scopes)}", file=sys.stderr)
        print(f"{settings.path}: OK", file=sys.stderr)
        return EXIT_OK
    if cmd == "demo":
        from agent import demo

        return demo.run_demo(auto_approve_s=args.auto_approve, duration_s=args.duration,
                             display=args.display, flow=args.flow)
    if cmd == "status":
        from agent import statusfile

        return statusfile.show_status(config.load(config.config_path(args.config)), as_json=args.json)
    if cmd == "sign-out":
        from agent import statusfile

        return statusfile.sign_out(config.load(config.config_path(args.config)))
    if cmd == "dead-letter":
        import sqlite3

        from agent import statusfile
        from agent.telemetry import dead_letters

        settings = config.load(config.config_path(args.config))
        try:
            # Through the running service (it holds the outbox exclusively), else on the file.
            return statusfile.dead_letter(settings, args.dl_action, getattr(args, "seqs", ()),
                                          all_=getattr(args, "all", False))
        except dead_letters.DeadLetterError as err:
            kind = "config error: command line" if err.exit_code == EXIT_CONFIG else "error"
            print(f"{kind}: dead-letter {args.dl_action}: {err}", file=sys.stderr)
            return err.exit_code
        except sqlite3.Error as err:
            print(f"error: {settings.outbox_path}: {err}", file=sys.stderr)
            return EXIT_FAILURE
    if cmd == "watch":
        from agent.mqtt import watch

        return watch.run_watch(url=args.url, prefix=args.prefix, ca_file=args.ca_file,
                               username=args.username, password_file=args.password_file,
                               as_json=args.json, count=args.count, timeout_s=args.timeout,
                               summary=args.summary, serve=args.serve,
                               serve_password_file=args.serve_password_file,
                               backlog_s=args.backlog_threshold, legacy=args.legacy_qos1,
                               allow_insecure=args.allow_insecure)
    if cmd == "mqtt-forget":
        from agent import statusfile
        from agent.mqtt import forget

        settings = config.load(config.config_path(args.config))
        if statusfile.running_pid(settings.device.state_dir) is not None:
            print("error: the service is running and would publish its status again; stop it first "
                  "(systemctl stop device-agent)", file=sys.stderr)
            return EXIT_FAILURE
        return forget.run_forget(settings)
    if cmd == "sim":
        if args.service == "idp":
            from agent.sim import idp

            return idp.main(args.args)
        from agent.sim import api

        return api.main(args.args)
    raise AssertionError(cmd)  # argparse restricts the choices
