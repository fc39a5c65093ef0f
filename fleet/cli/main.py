"""``python -m fleet``: the offline tools. Exit codes: 0 ok, 1 a mandatory check failed,
2 bad input (configuration, files), 3 the program itself failed.

Whatever the input, a command ends with one of those codes and one line per problem: a stack name
Pulumi would refuse, an output file in a missing directory or an unexpected failure never end in a
Python traceback (``--debug`` prints one for program failures)."""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import traceback
from pathlib import Path

from fleet.config.files import write_atomic
from fleet.config.problems import ConfigError, Problem
from fleet.config.stackfile import stack_name_problem

ROOT = Path(__file__).resolve().parents[2]
EXIT_OK, EXIT_MANDATORY, EXIT_INPUT, EXIT_PROGRAM = 0, 1, 2, 3


def _root(args: argparse.Namespace) -> Path:
    return Path(args.root).resolve() if getattr(args, "root", None) else ROOT


def _output_problem(option: str, value: str | None) -> Problem | None:
    """An output file must go to an existing directory: checked before any work is done."""
    if not value:
        return None
    parent = Path(value).parent
    if not parent.is_dir():
        return Problem(option, "", f"directory {str(parent)!r} does not exist; create it or write elsewhere")
    if Path(value).is_dir():
        return Problem(option, "", f"{value!r} is a directory; name a file")
    return None


def _write_output(option: str, path: str, text: str) -> None:
    try:
        write_atomic(Path(path), text, mode=0o644)
    except OSError as exc:
        raise ConfigError([Problem(option, "", f"cannot write {path!r}: {exc.strerror or exc}")]) from None


def check_arguments(args: argparse.Namespace) -> None:
    """Arguments every command shares, checked before it starts: ``--stack`` is a name Pulumi
    accepts (it becomes a file name and part of every URN), output files have a directory."""
    problems = []
    stack = getattr(args, "stack", None)
    if isinstance(stack, str) and stack_name_problem(stack):
        problems.append(Problem("--stack", "", stack_name_problem(stack)))
    for option, attribute in (("--json", "json"), ("--output", "output")):
        value = getattr(args, attribute, None)
        problem = _output_problem(option, value) if isinstance(value, str) and value != "-" else None
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)


def cmd_plan(args: argparse.Namespace) -> int:
    from fleet.plan.planner import PlanFailed, UpRefused, build_plan, render_markdown, render_text

    root = _root(args)
    # The plan is a short batch that allocates a few objects per registration and frees them by
    # reference counting; cyclic collection on its growing heap cost up to half its time and saved no
    # memory (make bench, docs/offline-plan.md "Scale"). Off for the run; the process ends right after.
    collecting = gc.isenabled()
    gc.disable()
    try:
        plan = build_plan(root, args.stack, passes=args.pass_)
    except PlanFailed as exc:
        where = failing_statement(exc.error, root)
        print(f"error: {exc}" + (f" (at {where})" if where else ""), file=sys.stderr)
        if args.debug:
            traceback.print_exception(exc.error)
        else:
            print("  (make plan DEBUG=1, or python -m fleet --debug plan, prints the traceback)", file=sys.stderr)
        return EXIT_PROGRAM
    except UpRefused as exc:  # what a real `pulumi up` would refuse, one line per reason
        print(f"error: a real `pulumi up` of {exc.stack} refuses:", file=sys.stderr)
        for line in exc.lines:
            print(f"  {line}", file=sys.stderr)
        return EXIT_INPUT
    finally:
        if collecting:  # a caller in the same process (the tests) gets its collector back
            gc.enable()
    if args.json == "-":  # the JSON alone on standard output, for pipes
        sys.stdout.write(plan.to_json())
    else:
        render = render_markdown if args.format == "markdown" else render_text
        sys.stdout.write(render(plan, verbose=args.verbose))
        if args.json:
            _write_output("--json", args.json, plan.to_json())
    mandatory = [v for v in plan.violations if v["enforcement"] == "mandatory"]
    return EXIT_MANDATORY if mandatory else EXIT_OK


def failing_statement(error: BaseException, root: Path) -> str | None:
    """``path:line in function`` of the innermost frame of the project's own code (this checkout or the
    planned root) in ``error``'s traceback: the statement to look at, whichever library raised."""
    homes = {ROOT.resolve(), root.resolve()}
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        path = Path(frame.filename).resolve()
        for home in homes:
            if path.is_relative_to(home) and ".venv" not in path.relative_to(home).parts:
                found = f"{path.relative_to(home)}:{frame.lineno} in {frame.name}"
    return found


def cmd_deploy(args: argparse.Namespace) -> int:
    from fleet.cli.deploy import DeployRefused, run

    try:
        return run(_root(args), args.action, args.stack, args.pulumi_args, args.ack)
    except DeployRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT


def cmd_policy_config(args: argparse.Namespace) -> int:
    """The stack's ``--policy-pack-config`` document on stdout: what ``make preview``/``make up`` pass,
    for workflows that run the CLI themselves (the cloud preview)."""
    import json

    from fleet.policy.rules import pack_config_for
    from fleet.stacks.load import load_config

    _, config = load_config(_root(args), args.stack)  # ConfigError: exit 2 with one line per problem
    sys.stdout.write(json.dumps(pack_config_for(config), indent=2, sort_keys=True) + "\n")
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    from fleet.cli import rollout

    return rollout.run(_root(args), args.stack, args.ack, Path(args.plan) if args.plan else None, reach=args.reach)


def cmd_lock(args: argparse.Namespace) -> int:
    import json
    import subprocess

    from fleet.images import lock
    from fleet.cli.deploy import DeployRefused, backend_url, check_cli

    root = _root(args)
    try:
        current = lock.load(root)
        if args.outputs:
            outputs = json.loads(Path(args.outputs).read_text(encoding="utf-8"))
        else:
            env = dict(os.environ)
            exe = check_cli(root, env)
            env["PULUMI_BACKEND_URL"] = backend_url(root, args.stack, "images", None, env)
            result = subprocess.run([exe, "--cwd", str(root), "stack", "output", "--json", "--stack", args.stack],
                                    env=env, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"error: pulumi stack output failed: {result.stderr.strip()}", file=sys.stderr)
                return EXIT_INPUT
            outputs = json.loads(result.stdout)
        merged, changes = lock.merge(current, outputs, replace=args.replace)
    except (json.JSONDecodeError, OSError) as exc:
        print(f"error: cannot read the images stack outputs: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (DeployRefused, lock.LockConflict) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    lock.write(root, merged)
    for line in changes or ["images.lock.json is up to date"]:
        print(line)
    return EXIT_OK


def cmd_collect(args: argparse.Namespace) -> int:
    import json

    from fleet.images import lock
    from fleet.stacks import collect
    from fleet.stacks.load import load_config

    root = _root(args)
    _, config = load_config(root, args.stack)
    if config.fleet.role != "images":
        print(f"error: stack {args.stack} has role {config.fleet.role}; builds are collected from the images stack",
              file=sys.stderr)
        return EXIT_INPUT
    results = collect.collect(collect.hosts_of(config, root, lock.load(root)), collect.GcloudBucket())
    for line in collect.report(results):
        print(line)
    Path(args.out).write_text(json.dumps(collect.lock_outputs(results), indent=2, sort_keys=True) + "\n",
                              encoding="utf-8")
    invalid = [r for r in results if r.state == collect.INVALID]
    return EXIT_MANDATORY if invalid else EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from fleet.plan.diff import DiffInputError, run_diff

    try:
        report = run_diff(_root(args), args.stack, args.base)
    except DiffInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    sys.stdout.write(report.markdown)
    if args.output:
        _write_output("--output", args.output, report.markdown)
    for failure in report.failures:
        print(f"mandatory check failed: {failure}", file=sys.stderr)
    return report.exit_code


def cmd_build_local(args: argparse.Namespace) -> int:
    import subprocess

    from fleet.images.buildscript import BuildScriptError
    from fleet.stacks.builds import local_build_script
    from fleet.images.recipes import BuildInputError

    out = Path(args.out).resolve()
    try:
        spec, script = local_build_script(_root(args), args.stack, args.image, out, bucket=args.bucket,
                                          work_dir=args.work_dir)
    except (BuildScriptError, BuildInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.sh").write_text(script, encoding="utf-8")
    print(f"building {spec.recipe} {args.image} (input hash {spec.input_hash}) into {out}")
    if args.script_only:
        return EXIT_OK
    return subprocess.run(["bash", str(out / "build.sh")], check=False).returncode


def cmd_measurements(args: argparse.Namespace) -> int:
    import json

    from fleet.attest import exports
    from fleet.plan.planner import PlanFailed, build_plan

    try:
        plan = build_plan(_root(args), args.stack, passes="preview")
    except PlanFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_PROGRAM
    document = json.loads(plan.to_json())
    if args.format == "flashbots":
        entries, notes = exports.flashbots(document, partial=args.partial)
        text = exports.render_flashbots(entries)
        exports.parse_flashbots(text)  # what we write, we can read
    else:
        text = exports.render_near_votes(exports.near_votes(document))
        exports.parse_near_votes(text)
        notes = [f"{name}: {m}" for name, app in json.loads(text)["apps"].items() for m in app["missing"]]
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from fleet.cli import gc
    from fleet.stacks.load import load_config

    root = _root(args)
    _, config = load_config(root, args.stack)
    try:
        lines = gc.run(root, config, apply_changes=args.apply)
    except gc.GcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    for line in lines:
        print(line)
    return EXIT_OK


def cmd_toolchain(args: argparse.Namespace) -> int:
    from fleet.cli import toolchain

    if args.tools == ["registry-host"]:
        print(toolchain.registry_host(_root(args), args.stack))
        return EXIT_OK
    unknown = [t for t in args.tools if t not in toolchain.PINS]
    if unknown:
        print(f"error: no pin for {', '.join(unknown)}; pinned: {', '.join(sorted(toolchain.PINS))}", file=sys.stderr)
        return EXIT_INPUT
    problems = [p for p in (toolchain.check(t) for t in args.tools) if p]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print("pinned versions: " + ", ".join(toolchain.PINS[t].wanted for t in args.tools))
    return EXIT_INPUT if problems else EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from fleet.cli import bench

    if args.floor:
        return bench.run_floor(_root(args), Path(args.floor), Path(args.out), args.pass_)
    return bench.run(_root(args), sizes=tuple(args.sizes), shapes=tuple(args.shapes), samples=args.samples)


# Subcommands whose module (and its dependencies: dcap-qvl, dstack-sdk) is imported only when that
# subcommand runs; the others see a one-line entry in --help.
LAZY_COMMANDS = {
    "comment": ("fleet.plan.prcomment", "post or update the pull request's plan-diff comment"),
    "verify": ("fleet.attest.verify", "check a guest's TcbInfo, quote and collateral against each other and the plan"),
}


def selected_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (after the global options), before anything is imported for it."""
    rest = iter(argv)
    for token in rest:
        if token == "--root":
            next(rest, None)
        elif not token.startswith("-"):
            return token
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fleet", description=__doc__)
    parser.add_argument("--root", help="project root (default: this checkout)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of program failures")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, summary) in LAZY_COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)

    plan = sub.add_parser("plan", help="run the program offline under mocks and show what it would create")
    plan.add_argument("--stack", required=True)
    plan.add_argument("--json", metavar="FILE", help="also write the plan as JSON ('-': only the JSON, to stdout)")
    plan.add_argument("--format", choices=("text", "markdown"), default="text")
    plan.add_argument("--verbose", action="store_true",
                      help="every resource of the tree, and the outputs and expected measurements as JSON")
    plan.add_argument("--pass", dest="pass_", choices=("preview", "up", "both"), default="preview",
                      help="preview (default): what a real preview shows; up: the update pass a real up runs, "
                           "every apply on stand-in values; both: show the preview, run both")
    plan.set_defaults(func=cmd_plan)

    diff = sub.add_parser("diff", help="Markdown diff of the offline plans of a base revision and the working tree")
    diff.add_argument("--stack", required=True)
    diff.add_argument("--base", required=True, help="git revision to compare with (planned with its own code)")
    diff.add_argument("--output", metavar="FILE", help="also write the Markdown here")
    diff.set_defaults(func=cmd_diff)

    lock_cmd = sub.add_parser("lock", help="record the images stack's build outputs in images.lock.json")
    lock_cmd.add_argument("--outputs", metavar="FILE",
                          help="the images stack's outputs as JSON (offline); default: pulumi stack output")
    lock_cmd.add_argument("--stack", default="images")
    lock_cmd.add_argument("--replace", action="store_true", help="overwrite entries whose values changed")
    lock_cmd.set_defaults(func=cmd_lock)

    collect_cmd = sub.add_parser("collect", help="read finished and failed image builds from the bucket, for make lock")
    collect_cmd.add_argument("--stack", default="images")
    collect_cmd.add_argument("--out", required=True, metavar="FILE", help="write what make lock OUTPUTS=FILE merges")
    collect_cmd.set_defaults(func=cmd_collect)

    local = sub.add_parser("build-local", help="run an image build on this machine (the build host's script)")
    local.add_argument("--stack", required=True, help="env stack that declares the image")
    local.add_argument("--image", required=True, help="key in dstack-fleet:images")
    local.add_argument("--out", required=True, help="output directory")
    local.add_argument("--bucket", help="also upload to this bucket, as a build host does")
    local.add_argument("--work-dir", help="build tree (a plain absolute path; default OUT/work)")
    local.add_argument("--script-only", action="store_true", help="write build.sh without running it")
    local.set_defaults(func=cmd_build_local)

    measurements = sub.add_parser(
        "measurements", help="the plan's expected registers in a format other verifiers consume")
    measurements.add_argument("--stack", required=True)
    measurements.add_argument("--format", required=True, choices=("flashbots", "near-votes"),
                              help="flashbots: attested-tls measurements file; near-votes: NEAR MPC vote arguments")
    measurements.add_argument("--partial", action="store_true",
                              help="flashbots: also write entries lacking a register (a missing index is not checked)")
    measurements.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    measurements.set_defaults(func=cmd_measurements)

    gc_cmd = sub.add_parser("gc", help="list (or with --apply, mark and delete) images and bucket artifacts "
                                       "nothing names any more, after the retention period")
    gc_cmd.add_argument("--stack", required=True)
    gc_cmd.add_argument("--apply", action="store_true", help="mark, unmark and delete (default: only list)")
    gc_cmd.set_defaults(func=cmd_gc)

    tools = sub.add_parser("toolchain", help="check that mkosi, skopeo or phala is the pinned version "
                                             "(or print the registry host: registry-host --stack S)")
    tools.add_argument("tools", nargs="+", metavar="NAME")
    tools.add_argument("--stack", default="images")
    tools.set_defaults(func=cmd_toolchain)

    bench = sub.add_parser("bench", help="plan time against the mocks engine's floor, peak memory, graph depth")
    bench.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], metavar="NODES")
    bench.add_argument("--shapes", nargs="+", choices=("ring", "mesh"), default=["ring", "mesh"])
    bench.add_argument("--samples", type=int, default=3)
    bench.add_argument("--floor", metavar="PLAN.json", help=argparse.SUPPRESS)  # one floor process
    bench.add_argument("--pass", dest="pass_", choices=("preview", "up"), default="preview", help=argparse.SUPPRESS)
    bench.add_argument("--out", metavar="FILE", help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)

    policy = sub.add_parser("policy-config", help="print the stack's policy pack config (--policy-pack-config)")
    policy.add_argument("--stack", required=True)
    policy.set_defaults(func=cmd_policy_config)

    deploy = sub.add_parser("deploy", help="run the real Pulumi CLI (make preview / make up)")
    deploy.add_argument("action", choices=("preview", "up"))
    deploy.add_argument("--stack", required=True)
    deploy.add_argument("--pulumi-arg", dest="pulumi_args", action="append", default=[],
                        help="an extra argument for pulumi (repeatable)")
    deploy.add_argument("--ack", action="append", default=[], metavar="SUBJECT",
                        help="up: apply a change a rule refuses, naming it: group:<group> (more than maxUnavailable "
                             "nodes down at once) or identity:app:<app> (a prod app's new identity); repeatable")
    deploy.set_defaults(func=cmd_deploy)

    roll = sub.add_parser("rollout", help="apply a change in waves: a targeted up per wave, a health wait and an "
                                          "attestation gate (fleet verify against the plan) before the next")
    roll.add_argument("--stack", required=True)
    roll.add_argument("--ack", action="append", default=[], metavar="SUBJECT",
                      help="identity:app:<app>: let a prod app take a new identity (repeatable)")
    roll.add_argument("--plan", metavar="PLAN.json",
                      help="verify against this plan JSON (e.g. the one reviewed) instead of planning the checkout")
    roll.add_argument("--reach", choices=["direct", "iap"],
                      help="how nodes are read in this run, instead of the stack's dstack-fleet:rollout.reach: direct "
                           "(the URLs as written) or iap (through gcloud compute start-iap-tunnel)")
    roll.set_defaults(func=cmd_rollout)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(selected_command(argv))
    args = parser.parse_args(argv)
    os.environ.setdefault("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
    try:
        check_arguments(args)
        return args.func(args)
    except ConfigError as exc:  # bad input from any command: one line per problem, exit 2
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_PROGRAM
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: one line, the traceback on request
        first = (str(exc).splitlines() or [""])[0][:300]
        print(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        if args.debug:
            traceback.print_exception(exc)
        return EXIT_PROGRAM
