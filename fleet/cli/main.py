"""``python -m fleet``: the offline tools. Exit codes: 0 ok, 1 a mandatory check failed,
2 bad input (configuration, files), 3 the program itself failed.

Whatever the input, a command ends with one of those codes and one line per problem: a stack name
Pulumi would refuse, an output file in a missing directory or an unexpected failure never end in a
Python traceback (``--debug`` prints one for program failures)."""

from __future__ import annotations

import argparse
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
        problem = _output_problem(option, value) if isinstance(value, str) else None
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)


def cmd_plan(args: argparse.Namespace) -> int:
    from fleet.plan.planner import PlanFailed, build_plan, render_markdown, render_text

    root = _root(args)
    try:
        plan = build_plan(root, args.stack)
    except PlanFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exception(exc.error)
        return EXIT_PROGRAM
    text = render_markdown(plan) if args.format == "markdown" else render_text(plan)
    sys.stdout.write(text)
    if args.json:
        _write_output("--json", args.json, plan.to_json())
    mandatory = [v for v in plan.violations if v["enforcement"] == "mandatory"]
    return EXIT_MANDATORY if mandatory else EXIT_OK


def cmd_deploy(args: argparse.Namespace) -> int:
    from fleet.cli.deploy import DeployRefused, run

    try:
        return run(_root(args), args.action, args.stack, args.pulumi_args)
    except DeployRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT


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


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from fleet.cli import bench

    if args.one:
        print(json.dumps(bench.measure_one(args.one, _root(args))))
        return EXIT_OK
    return bench.run(_root(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fleet", description=__doc__)
    parser.add_argument("--root", help="project root (default: this checkout)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of program failures")
    sub = parser.add_subparsers(dest="command", required=True)
    from fleet.plan import prcomment
    from fleet.attest import verify as verify_cmd

    prcomment.add_parser(sub)
    verify_cmd.add_parser(sub)

    plan = sub.add_parser("plan", help="run the program offline under mocks and show what it would create")
    plan.add_argument("--stack", required=True)
    plan.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    plan.add_argument("--format", choices=("text", "markdown"), default="text")
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

    local = sub.add_parser("build-local", help="run an image build on this machine (the build host's script)")
    local.add_argument("--stack", required=True, help="env stack that declares the image")
    local.add_argument("--image", required=True, help="key in dstack-fleet:images")
    local.add_argument("--out", required=True, help="output directory")
    local.add_argument("--bucket", help="also upload to this bucket, as a build host does")
    local.add_argument("--work-dir", help="build tree (a plain absolute path; default OUT/work)")
    local.add_argument("--script-only", action="store_true", help="write build.sh without running it")
    local.set_defaults(func=cmd_build_local)

    bench = sub.add_parser("bench", help="plan time, peak memory and graph depth for 10, 100, 1000 nodes")
    bench.add_argument("--one", type=int, metavar="NODES", help=argparse.SUPPRESS)
    bench.set_defaults(func=cmd_bench)

    deploy = sub.add_parser("deploy", help="run the real Pulumi CLI (make preview / make up)")
    deploy.add_argument("action", choices=("preview", "up"))
    deploy.add_argument("--stack", required=True)
    deploy.add_argument("--pulumi-arg", dest="pulumi_args", action="append", default=[],
                        help="an extra argument for pulumi (repeatable)")
    deploy.set_defaults(func=cmd_deploy)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
