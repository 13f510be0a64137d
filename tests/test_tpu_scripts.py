"""tpu_scripts/: every script's dry run prints the commands a real run would run, and runs none.

Each script runs here as a user runs it, with fake settings (project, zone, bucket) and with
tripwires first on PATH in place of gcloud, git, ssh, scp, mkdir and sleep: a tripwire that is
called marks the test failed. The printed lines are parsed back with shlex (a POSIX shell's
word splitting), and the commands the hosts would run (`--command=...`) are parsed again, so the
assertions are on the exact words each program would receive. One test runs run_resilient.sh for
real against a fake gcloud and git that record their arguments and play a preemption: the
commands it runs equal those its dry run prints. Another runs the printed host command lines in
bash with a fake es-jax: they start a run in the background, see it alive, stop it, and pass every
flag through both shells unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
EXECUTABLES = sorted(p for p in SCRIPTS.glob("*.sh") if p.name != "env.sh")  # env.sh is sourced
TRIPWIRES = ("gcloud", "gsutil", "git", "ssh", "scp", "mkdir", "sleep")
SETTINGS = {
    "BUCKET": "test-bucket",
    "PROJECT": "test-project",
    "ZONE": "europe-west4-a",
    "TPU_NAME": "test-slice",
    "ACCELERATOR": "v4-32",
}
PLACE = ["--zone=europe-west4-a", "--project=test-project"]


class Outcome(NamedTuple):
    """How a script ended: its exit status, the commands it printed (as argv lists), stderr."""

    returncode: int
    commands: list[list[str]]
    stderr: str


@pytest.fixture
def dry_run(tmp_path):
    """Runs a tpu_script with DRY_RUN=1 and SETTINGS; fails the test if it ran any tripwire."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "called"
    for name in TRIPWIRES:
        tripwire = bin_dir / name
        tripwire.write_text(f'#!/bin/sh\necho "{name} $*" >> "{called}"\nexit 97\n')
        tripwire.chmod(0o755)

    def run(script: str, *args: str, dry_flag: bool = False, **settings: str) -> Outcome:
        env = {**base_env(bin_dir, tmp_path), **SETTINGS, **settings}
        if not dry_flag:
            env["DRY_RUN"] = "1"
        argv = [str(SCRIPTS / script), *(["--dry-run"] if dry_flag else []), *args]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert not called.exists(), f"{script} ran {called.read_text()!r} in a dry run"
        commands = [shlex.split(line) for line in proc.stdout.splitlines()]
        return Outcome(proc.returncode, commands, proc.stderr)

    return run


def base_env(bin_dir: Path, home: Path) -> dict[str, str]:
    """A clean environment (no settings of the caller's) with `bin_dir` first on PATH."""
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "TMPDIR": str(home)}


def remote(command: list[str]) -> list[str]:
    """The words of the shell line that a `gcloud ... ssh --command=LINE` runs on the hosts."""
    (line,) = [arg.removeprefix("--command=") for arg in command if arg.startswith("--command=")]
    return shlex.split(line)


def es_jax_argv(words: list[str]) -> list[str]:
    """The `es-jax ...` command within a host's shell words, up to its output redirection."""
    start = words.index(".venv/bin/es-jax")
    end = min(words.index(w, start) for w in (">", "2>&1") if w in words[start:])
    return words[start:end]


def action(command: list[str]) -> str:
    """What one printed command does, in a word, for comparing sequences of them."""
    if command[0] == "git":
        return "pack"
    if command[:4] == ["gcloud", "compute", "tpus", "queued-resources"]:
        return command[4]  # describe, create, delete
    if command[:3] == ["gcloud", "storage", "ls"]:
        return "finished?"
    if command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and command[4] == "scp":
        return "copy"
    assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], command
    words = remote(command)
    if words[:2] == ["kill", "-0"]:
        return "alive?"
    if "pretrain" in words:
        return "launch"
    if "install" in words:
        return "install"
    assert "kill" in words, words
    return "stop"


def ssh_worker(command: list[str]) -> str:
    """The --worker value of a gcloud tpu-vm ssh/scp command."""
    (worker,) = [arg.removeprefix("--worker=") for arg in command if arg.startswith("--worker=")]
    return worker


# ------------------------------------------------------------------------------ every script


@pytest.mark.parametrize("path", [*EXECUTABLES, SCRIPTS / "env.sh"], ids=lambda p: p.name)
def test_every_script_parses(path):
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_finds_nothing():
    subprocess.run(["shellcheck", "-x", *map(str, EXECUTABLES)], check=True, cwd=SCRIPTS.parent)


def test_the_scripts_are_the_ones_tested_here():
    assert [p.name for p in EXECUTABLES] == [
        "collect.sh",
        "create.sh",
        "emergence.sh",
        "launch.sh",
        "run_resilient.sh",
        "sweep.sh",
        "teardown.sh",
    ]
    assert all(os.access(p, os.X_OK) for p in EXECUTABLES)


def test_a_dry_run_flag_equals_dry_run_in_the_environment(dry_run):
    by_flag = dry_run("launch.sh", "data_60", "--config.data.fraction=0.6", dry_flag=True)
    by_env = dry_run("launch.sh", "data_60", "--config.data.fraction=0.6")
    assert by_flag.returncode == by_env.returncode == 0
    assert by_flag.commands == by_env.commands
    assert len(by_flag.commands) == 2


# ------------------------------------------------------------------------------ create, teardown


def test_create_asks_for_a_spot_queued_resource_then_sets_up_every_host(dry_run):
    outcome = dry_run("create.sh")
    assert outcome.returncode == 0, outcome.stderr
    commands = outcome.commands
    assert [action(c) for c in commands] == [
        "describe", "create", "describe", "pack", "copy", "install",
    ]  # fmt: skip
    assert commands[1] == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "test-slice-request",
        "--node-id=test-slice", *PLACE, "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base", "--spot",
    ]  # fmt: skip
    assert commands[0][5:] == ["test-slice-request", *PLACE, "--format=value(state.state)"]
    assert ssh_worker(commands[4]) == ssh_worker(commands[5]) == "all"
    archive = commands[3][commands[3].index("-o") + 1]
    assert commands[3] == ["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"]
    assert commands[4][5:7] == [archive, "test-slice:~/es_jax.tar.gz"]
    install = remote(commands[5])
    assert install[install.index("install") :][-4:] == [
        "-e", ".[gcs]", "jax[tpu]", "datasets",
    ]  # fmt: skip
    assert "uv venv -q --python 3.11 .venv;" in " ".join(install)
    everything = " ".join(" ".join(c) for c in commands)
    assert "gcsfuse" not in everything
    assert "/gcs/" not in everything


def test_create_on_demand_has_no_spot_flag(dry_run):
    outcome = dry_run("create.sh", SPOT="0", PROJECT="")
    assert outcome.returncode == 0, outcome.stderr
    (create,) = [c for c in outcome.commands if action(c) == "create"]
    assert "--spot" not in create
    assert not any(arg.startswith("--project") for c in outcome.commands for arg in c)


def test_create_does_not_ask_twice_for_an_existing_request(dry_run):
    outcome = dry_run("create.sh", DRY_RUN_STATES="WAITING_FOR_RESOURCES PROVISIONING ACTIVE")
    assert outcome.returncode == 0, outcome.stderr
    assert [action(c) for c in outcome.commands] == [
        "describe", "describe", "describe", "pack", "copy", "install",
    ]  # fmt: skip
    assert "exists (WAITING_FOR_RESOURCES)" in outcome.stderr


def test_create_stops_when_the_request_fails(dry_run):
    outcome = dry_run("create.sh", DRY_RUN_STATES="NOT_FOUND FAILED")
    assert outcome.returncode == 1
    assert [action(c) for c in outcome.commands] == ["describe", "create", "describe"]
    assert (
        outcome.stderr.strip()
        .splitlines()[-1]
        .startswith("error: queued resource test-slice-request is FAILED")
    )


def test_teardown_deletes_the_request_with_its_slice_and_asks_first(dry_run):
    outcome = dry_run("teardown.sh", BUCKET="")
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.commands == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "test-slice-request",
         *PLACE, "--force"],
    ]  # fmt: skip


# ------------------------------------------------------------------------------ launch


def test_launch_runs_pretrain_on_every_host_with_a_gcs_workdir(dry_run):
    odd_flag = "--config.data.corpora=('wiki', \"it's\")"  # quotes and spaces survive both shells
    outcome = dry_run("launch.sh", "data_60", "--config.data.fraction=0.6", odd_flag)
    assert outcome.returncode == 0, outcome.stderr
    alive, launch = outcome.commands
    assert (action(alive), ssh_worker(alive)) == ("alive?", "0")
    assert remote(alive) == ["kill", "-0", "$(cat ~/data_60.pid 2>/dev/null)", "2>/dev/null"]
    assert (action(launch), ssh_worker(launch)) == ("launch", "all")
    assert launch[5:6] == ["test-slice"]
    assert launch[6:8] == PLACE
    words = remote(launch)
    assert words[words.index(".venv/bin/es-jax") - 2 :][:2] == ["JAX_PLATFORMS=tpu", "nohup"]
    assert es_jax_argv(words) == [
        ".venv/bin/es-jax", "pretrain", "--config", "configs/bert_base_pretrain.py",
        "--workdir", "gs://test-bucket/runs/data_60", "--config.distributed=True",
        "--config.data.fraction=0.6", odd_flag,
    ]  # fmt: skip
    assert words[-8:] == ["<", "/dev/null", "&", "echo", "$!", ">", "~/data_60.pid;", "}"]
    assert words[words.index(">") + 1] == "~/data_60.log"


def test_launch_takes_its_config_and_a_results_folder_from_the_environment(dry_run):
    outcome = dry_run(
        "launch.sh", "run1", CONFIG="configs/pretrain_smoke.py", RESULTS="gs://other/project-x/"
    )
    assert outcome.returncode == 0, outcome.stderr
    argv = es_jax_argv(remote(outcome.commands[-1]))
    assert argv[argv.index("--config") + 1] == "configs/pretrain_smoke.py"
    assert argv[argv.index("--workdir") + 1] == "gs://other/project-x/runs/run1"


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        ((), {}, None),
        (("a b",), {}, "error: name 'a b': use letters, digits"),
        (("data_60",), {"BUCKET": "gs://test-bucket"}, "error: BUCKET=gs://test-bucket: give the"),
        (("data_60",), {"BUCKET": ""}, "error: set BUCKET to a GCS bucket name"),
        (("data_60",), {"RESULTS": "/gcs/bucket"}, "error: RESULTS=/gcs/bucket: give a gs:// URL"),
        (("data_60",), {"SPOT": "yes"}, "error: SPOT=yes: set it to 1"),
    ],
)
def test_launch_refuses_what_it_cannot_run_with_one_line(dry_run, args, settings, message):
    outcome = dry_run("launch.sh", *args, **settings)
    assert outcome.commands == []
    if message is None:  # no run name: the usage
        assert outcome.returncode == 2
        assert outcome.stderr.startswith("# Usage: BUCKET=my-bucket tpu_scripts/launch.sh")
    else:
        assert outcome.returncode == 1
        assert outcome.stderr.count("\n") == 1
        assert outcome.stderr.startswith(message)


# ------------------------------------------------------------------------------ run_resilient

ONE_LAUNCH = ["finished?", "alive?", "copy", "install", "stop", "launch"]


def test_run_resilient_recreates_a_preempted_slice_and_launches_again(dry_run):
    outcome = dry_run("run_resilient.sh", "data_60", "--config.data.fraction=0.6")
    assert outcome.returncode == 0, outcome.stderr
    commands = outcome.commands
    assert [action(c) for c in commands] == [
        "pack",
        "describe", "create",                    # NOT_FOUND: ask for the slice
        "describe", *ONE_LAUNCH,                 # ACTIVE: set up and launch
        "describe", "delete", "create",          # SUSPENDED: preempted, ask again
        "describe", *ONE_LAUNCH,                 # ACTIVE: the same launch, which resumes
        "describe", "finished?",                 # ACTIVE: results.json is there
    ]  # fmt: skip
    launches = [c for c in commands if action(c) == "launch"]
    assert launches[0] == launches[1]
    assert es_jax_argv(remote(launches[0]))[-3:] == [
        "gs://test-bucket/runs/data_60", "--config.distributed=True", "--config.data.fraction=0.6",
    ]  # fmt: skip
    (delete,) = [c for c in commands if action(c) == "delete"]
    assert delete[5:] == ["test-slice-request", *PLACE, "--force", "--quiet"]
    creates = [c for c in commands if action(c) == "create"]
    assert creates[0] == creates[1]
    assert "--spot" in creates[0]
    assert commands[-1] == ["gcloud", "storage", "ls", "gs://test-bucket/runs/data_60/results.json"]
    assert "Run data_60 finished" in outcome.stderr


def test_run_resilient_waits_while_the_request_is_queued(dry_run):
    states = "NOT_FOUND WAITING_FOR_RESOURCES PROVISIONING ACTIVE"
    outcome = dry_run("run_resilient.sh", "r", DRY_RUN_STATES=states)
    assert outcome.returncode == 0, outcome.stderr
    assert [action(c) for c in outcome.commands] == [
        "pack", "describe", "create", "describe", "describe", "describe", *ONE_LAUNCH,
        "describe", "finished?",
    ]  # fmt: skip


def test_run_resilient_recreates_a_slice_that_failed_after_it_was_up(dry_run):
    outcome = dry_run("run_resilient.sh", "r", DRY_RUN_STATES="ACTIVE FAILED ACTIVE")
    assert outcome.returncode == 0, outcome.stderr
    assert [action(c) for c in outcome.commands] == [
        "pack", "describe", *ONE_LAUNCH, "describe", "delete", "create",
        "describe", *ONE_LAUNCH, "describe", "finished?",
    ]  # fmt: skip


def test_run_resilient_stops_on_a_request_that_fails_before_its_slice_is_up(dry_run):
    outcome = dry_run("run_resilient.sh", "r", DRY_RUN_STATES="NOT_FOUND FAILED")
    assert outcome.returncode == 1
    assert [action(c) for c in outcome.commands] == ["pack", "describe", "create", "describe"]
    assert "error: queued resource test-slice-request FAILED before its slice came up" in (
        outcome.stderr
    )


def test_run_resilient_gives_up_on_a_run_that_keeps_stopping_on_a_healthy_slice(dry_run):
    outcome = dry_run("run_resilient.sh", "r", DRY_RUN_STATES="ACTIVE " * 6, MAX_LAUNCHES="2")
    assert outcome.returncode == 1
    assert [action(c) for c in outcome.commands] == [
        "pack", "describe", *ONE_LAUNCH, "describe", *ONE_LAUNCH, "describe", "finished?",
        "alive?",
    ]  # fmt: skip
    assert outcome.stderr.strip().splitlines()[-1] == (
        "error: run r stopped 2 times on an ACTIVE slice without finishing: "
        "read ~/r.log on worker 0 of test-slice."
    )


FAKE_GCLOUD = """#!{python}
# Records its name and arguments; answers as Cloud TPU would for the states in STATES, one per
# describe.
import json, sys
from pathlib import Path

here = Path(sys.argv[0]).parent
with (here / "log").open("a") as log:
    log.write(json.dumps([Path(sys.argv[0]).name, *sys.argv[1:]]) + "\\n")
states = (here / "STATES").read_text().split()
looks = here / "looks"
args = sys.argv[1:]
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    seen = int(looks.read_text()) if looks.exists() else 0
    looks.write_text(str(seen + 1))
    state = states[min(seen, len(states) - 1)]
    if state == "NOT_FOUND":
        sys.exit(print("ERROR: (gcloud) NOT_FOUND: Resource not found", file=sys.stderr) or 1)
    print(state)
elif args[:2] == ["storage", "ls"]:  # finished once the states are used up, as in a dry run
    sys.exit(0 if int(looks.read_text()) > len(states) else 1)
elif any(a.startswith("--command=kill -0") for a in args):  # nothing is running yet
    sys.exit(1)
"""


def test_a_real_run_runs_exactly_what_its_dry_run_prints(dry_run, tmp_path):
    states = "NOT_FOUND ACTIVE SUSPENDED ACTIVE"
    printed = dry_run("run_resilient.sh", "data_60", "--config.data.fraction=0.6")
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "STATES").write_text(states)
    (fakes / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (fakes / "git").write_text(FAKE_GCLOUD.format(python=sys.executable))
    for fake in ("gcloud", "git"):
        (fakes / fake).chmod(0o755)
    env = {**base_env(fakes, tmp_path), **SETTINGS, "POLL_SECONDS": "0"}
    argv = [str(SCRIPTS / "run_resilient.sh"), "data_60", "--config.data.fraction=0.6"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ran = [json.loads(line) for line in (fakes / "log").read_text().splitlines()]
    assert ran == printed.commands
    assert len(ran) == 22
    assert "+ gcloud compute tpus queued-resources create test-slice-request" in proc.stderr
    assert "queued resource test-slice-request: SUSPENDED" in proc.stderr


# ------------------------------------------------------------------------------ analysis, collect


def test_emergence_runs_on_worker_0_alone_on_the_cpu(dry_run):
    outcome = dry_run("emergence.sh", "--config.thresholds=0.001,0.01")
    assert outcome.returncode == 0, outcome.stderr
    (command,) = outcome.commands
    assert ssh_worker(command) == "0"
    words = remote(command)
    assert "JAX_PLATFORMS=cpu" in words
    assert es_jax_argv(words) == [
        ".venv/bin/es-jax", "emergence", "--workdir", "gs://test-bucket/runs",
        "--config.thresholds=0.001,0.01",
    ]  # fmt: skip
    assert words[-3:] == ["|", "tee", "~/emergence.log"]


def test_a_sweep_runs_on_the_tpu_of_a_one_host_slice_only(dry_run):
    args = ("volumes", "--config", "configs/mlm_checkpoints_sweep.py")
    outcome = dry_run("sweep.sh", *args, ANALYSIS_PLATFORM="tpu", ACCELERATOR="v4-8")
    assert outcome.returncode == 0, outcome.stderr
    (command,) = outcome.commands
    words = remote(command)
    assert ssh_worker(command) == "0"
    assert "JAX_PLATFORMS=tpu" in words
    assert es_jax_argv(words) == [
        ".venv/bin/es-jax", "sweep", "--workdir", "gs://test-bucket/sweeps/volumes",
        "--config", "configs/mlm_checkpoints_sweep.py",
    ]  # fmt: skip
    assert words[-1] == "~/sweep_volumes.log"
    refused = dry_run("sweep.sh", *args, ANALYSIS_PLATFORM="tpu", ACCELERATOR="v5litepod-16")
    assert refused.returncode == 1
    assert refused.commands == []
    assert refused.stderr.startswith("error: ANALYSIS_PLATFORM=tpu needs a slice of one host;")


def test_collect_copies_the_results_without_checkpoints(dry_run):
    outcome = dry_run("collect.sh", "runs/from_tpu")
    assert outcome.returncode == 0, outcome.stderr
    mkdir, rsync, scp = outcome.commands
    assert mkdir == ["mkdir", "-p", "runs/from_tpu"]
    (exclude,) = [a.removeprefix("--exclude=") for a in rsync if a.startswith("--exclude=")]
    assert [a for a in rsync if not a.startswith("--exclude=")] == [
        "gcloud", "storage", "rsync", "--recursive", "gs://test-bucket", "runs/from_tpu",
    ]  # fmt: skip
    assert "," not in exclude  # gcloud splits --exclude at commas
    skipped = {
        "runs/data_100/checkpoints/1000/state/array_metadatas/process_0": True,
        "runs/data_100/corrupt_checkpoints/7/_METADATA": True,
        "runs/data_100/results.json": False,
        "runs/data_100/train_log.jsonl": False,
        "runs/emergence.json": False,
        "sweeps/volumes/results.csv": False,
    }
    for path, expected in skipped.items():  # gcloud matches the path relative to the source
        assert bool(re.match(exclude, path)) is expected, path
        assert bool(re.search(exclude, path)) is expected, path
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == ["test-slice:~/*.log", "runs/from_tpu/"]
    assert ssh_worker(scp) == "0"


# ------------------------------------------------------------------------------ the hosts' lines

FAKE_ES_JAX = """#!/bin/sh
# Records its arguments and JAX_PLATFORMS; as pretrain, stays alive like a training run.
printf '%s\\n' "$JAX_PLATFORMS" "$@" > "$HOME/es_jax_argv"
if [ "$1" = pretrain ]; then exec sleep 60; fi
echo "analysed"
"""


def test_the_host_lines_start_check_and_stop_a_run_in_bash(dry_run, tmp_path):
    odd_flag = "--config.data.corpora=('wiki', \"it's\")"
    launch = dry_run("launch.sh", "data_60", odd_flag).commands[-1]
    resilient = dry_run("run_resilient.sh", "data_60", DRY_RUN_STATES="ACTIVE").commands
    alive, stop = (c for c in resilient if action(c) in ("alive?", "stop"))
    emergence = dry_run("emergence.sh").commands[-1]
    home = tmp_path / "host"
    (home / "es_jax" / ".venv" / "bin").mkdir(parents=True)
    fake = home / "es_jax" / ".venv" / "bin" / "es-jax"
    fake.write_text(FAKE_ES_JAX)
    fake.chmod(0o755)

    def on_host(command: list[str]) -> int:
        """Runs a printed ssh command's --command line as the host's login shell would."""
        (line,) = [a.removeprefix("--command=") for a in command if a.startswith("--command=")]
        env = {"PATH": os.environ["PATH"], "HOME": str(home)}
        return subprocess.run(["bash", "-c", line], env=env, timeout=30).returncode

    assert on_host(alive) == 1  # no pid file yet
    assert on_host(launch) == 0
    pid = int((home / "data_60.pid").read_text())
    try:
        for _ in range(100):  # the background process records its arguments
            argv = home / "es_jax_argv"
            if argv.exists() and argv.read_text().endswith("\n"):
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert argv.read_text().splitlines() == [
            "tpu", "pretrain", "--config", "configs/bert_base_pretrain.py",
            "--workdir", "gs://test-bucket/runs/data_60", "--config.distributed=True", odd_flag,
        ]  # fmt: skip
        assert on_host(alive) == 0
        assert on_host(stop) == 0  # kills the run and waits for it to end
        assert on_host(alive) == 1
    finally:
        if on_host(alive) == 0:
            os.kill(pid, 15)
    assert on_host(emergence) == 0
    assert argv.read_text().splitlines() == [
        "cpu", "emergence", "--workdir", "gs://test-bucket/runs",
    ]  # fmt: skip
    assert (home / "emergence.log").read_text() == "analysed\n"
