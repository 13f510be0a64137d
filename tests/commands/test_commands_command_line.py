"""One command line for every command: config files and variants, typed overrides (lists and
nested keys included), and one clear line for anything wrong, through the real `es-jax` entry."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from etils import epath

import es_jax
from es_jax import cli
from es_jax.commands import command_line, sweep, sweep_config
from es_jax.commands.command_line import UsageError
from es_jax.models import hub

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def parse(*argv, default=sweep_config.default_config):
    return command_line.parse("sweep", list(argv), default)


def test_overrides_are_typed_like_the_values_they_replace(tmp_path):
    config, workdir = parse(
        "--workdir",
        str(tmp_path),
        "--config.grid=0.0,0.5",
        "--config.refine=2",
        "--config.models.minilm.tasks=lee",
        "--config.epsilon.absolute=2",
        "--config.data_dir=/data",
    )
    assert workdir == tmp_path
    assert config.grid == (0.0, 0.5)
    assert config.refine == 2
    assert config.models.minilm.tasks == ("lee",)
    assert config.epsilon.absolute == 2.0
    assert isinstance(config.epsilon.absolute, float)
    assert config.data_dir == "/data"


def test_a_tuple_of_strings_is_a_literal_or_a_repeated_flag(tmp_path):
    literal, _ = parse(
        "--workdir", str(tmp_path), "--config.models.minilm.tasks=('lee', 'simlex999')"
    )
    repeated, _ = parse(
        "--workdir", str(tmp_path),
        "--config.models.minilm.tasks=lee", "--config.models.minilm.tasks=simlex999",
    )
    assert literal.models.minilm.tasks == repeated.models.minilm.tasks == ("lee", "simlex999")


def test_config_file_with_variant_and_overrides(tmp_path):
    config, _ = parse(
        "--config", f"{CONFIGS / 'default.py'}:tiny", "--workdir", str(tmp_path), "--config.seed=3"
    )
    assert config.grid == (0.0, 0.5)
    assert config.seed == 3
    assert config.models.minilm.tiny.model_type == "bert"


def test_config_file_of_the_user(tmp_path):
    file = tmp_path / "exp.py"
    file.write_text(
        "from es_jax.commands import sweep_config\n\n"
        "def get_config():\n"
        "    config = sweep_config.default_config()\n"
        "    config.grid = (0.0, 0.2)\n"
        "    return config\n"
    )
    config, _ = parse(f"--config={file}", "--workdir", str(tmp_path))
    assert config.grid == (0.0, 0.2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config.gird=0.1"], r"--config\.gird: unknown config key 'gird' \(did you mean 'grid'"),
        (["--config.models.minilm.taks=lee"], r"unknown config key 'models\.minilm\.taks'"),
        (["--config.models.bert.tasks=lee"], r"unknown config key 'models\.bert'"),
        (["--config.refine=many"], r"--config\.refine=many: invalid literal for int"),
        (["--config", "no/such.py"], r"--config no/such\.py: no such file"),
        (["--config", str(CONFIGS / "default.py") + ":huge"], r"unknown config variant 'huge'"),
        ([], r"--workdir DIR is required"),
    ],
)
def test_bad_command_lines_are_one_line_naming_what_is_wrong(tmp_path, argv, message):
    workdir = [] if "--workdir" in message else ["--workdir", str(tmp_path)]
    with pytest.raises(UsageError, match=message) as caught:
        parse(*workdir, *argv)
    assert "\n" not in str(caught.value)


def test_config_is_required_without_an_embedded_default(tmp_path):
    with pytest.raises(UsageError, match=r"--config FILE is required"):
        command_line.parse("pretrain", ["--workdir", str(tmp_path)], None)


def test_help_lists_the_config_keys_with_their_defaults(capsys):
    cli.main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert "usage: es-jax sweep [--config FILE[:variant]] --workdir DIR" in text
    assert "--config.grid=(0.0, 0.1, 0.2" in text
    assert "--config.models.minilm.tasks=('lee', 'wordsim353', 'simlex999')" in text


def test_help_of_a_config_file_lists_its_keys(capsys):
    cli.main(["pretrain", "--config", str(CONFIGS / "pretrain_smoke.py"), "--help"])
    text = capsys.readouterr().out
    assert "--config.model.hidden_size=32" in text
    assert "--config.total_steps=30" in text


def test_version(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"es-jax {es_jax.__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--workdir", "w", "--config.gird=1"], "es-jax sweep: --config.gird: unknown"),
        (["pretrain", "--workdir", "w"], "es-jax pretrain: --config FILE is required"),
        (["emergence", "--config.sparsities=x"], "es-jax emergence: --workdir DIR is required"),
        (["nope"], "es-jax: unknown command 'nope'"),
    ],
)
def test_the_entry_point_prints_one_line_and_no_traceback(argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "es_jax.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stderr


def run_cli(*argv, cwd=None):
    """`es-jax argv` in a fresh process: (exit code, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "es_jax.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    return result.returncode, result.stderr


def assert_one_line(code, stderr, message):
    """A failed command that printed exactly one line, matching `message`, and no traceback."""
    assert code != 0
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert re.search(message, stderr), stderr


BAD_CONFIG_FILES = {
    "syntax": (
        "def get_config(:\n    pass\n",
        r"--config syntax\.py: syntax error in syntax\.py line 1: invalid syntax",
    ),
    "returns_none": (
        "def get_config():\n    config = 1\n",
        r"--config returns_none\.py: get_config\(\) returned None, not an "
        r"ml_collections\.ConfigDict",
    ),
    "returns_dict": (
        "def get_config():\n    return {'grid': (0.5,)}\n",
        r"--config returns_dict\.py: get_config\(\) returned dict, not an ml_collections",
    ),
    "raises": (
        "def get_config():\n    return 1 / 0\n",
        r"--config raises\.py: get_config\(\) raised ZeroDivisionError: division by zero "
        r"\(raises\.py line 2\)",
    ),
    "bad_import": (
        "import no_such_module\n\ndef get_config():\n    pass\n",
        r"--config bad_import\.py: loading the file raised ModuleNotFoundError: "
        r"No module named 'no_such_module' \(bad_import\.py line 1\)",
    ),
}


@pytest.mark.parametrize("help_flag", [[], ["--help"]], ids=["run", "help"])
@pytest.mark.parametrize("name", sorted(BAD_CONFIG_FILES))
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, name, help_flag):
    text, message = BAD_CONFIG_FILES[name]
    (tmp_path / f"{name}.py").write_text(text)
    code, stderr = run_cli(
        "sweep", "--config", f"{name}.py", "--workdir", tmp_path / "run", *help_flag, cwd=tmp_path
    )
    assert_one_line(code, stderr, rf"^es-jax sweep: {message}")
    assert not (tmp_path / "run").exists()


def test_a_config_argument_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(UsageError, match=r"--config .*: is a directory; give a config \.py file"):
        parse("--config", str(tmp_path), "--workdir", str(tmp_path))


@pytest.mark.parametrize(
    ("workdir", "message"),
    [
        ("file", r"--workdir .*/file: is a file, not a directory"),
        ("file/run", r"--workdir .*/file/run: cannot be created, because .*/file is a file"),
        ("/proc/es_jax_run", r"--workdir /proc/es_jax_run: is in /proc, which is not writable"),
        ("/proc", r"--workdir /proc: is not writable"),
        ("", r"--workdir is empty"),
    ],
)
def test_a_workdir_that_cannot_hold_results_is_refused_before_any_work(tmp_path, workdir, message):
    (tmp_path / "file").write_text("not a directory")
    given = workdir if workdir.startswith("/") or not workdir else str(tmp_path / workdir)
    with pytest.raises(UsageError, match=message) as caught:
        parse("--workdir", given)
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_workdir_in_a_read_only_directory_is_refused(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    with pytest.raises(UsageError, match=r"read_only/run: is in .*read_only, which is not"):
        parse("--workdir", str(read_only / "run"))
    with pytest.raises(UsageError, match=r"read_only: is not writable"):
        parse("--workdir", str(read_only))


def test_checking_the_workdir_creates_nothing(tmp_path):
    _, workdir = parse("--workdir", str(tmp_path / "a" / "b"))
    assert workdir == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["gs://bucket/runs/a", "gs://bucket", "s3://bucket/x/y"])
def test_a_bucket_workdir_keeps_its_url_intact(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, workdir = parse("--workdir", url)
    assert isinstance(workdir, epath.Path)
    assert os.fspath(workdir) == url
    assert os.fspath(workdir / "checkpoints") == f"{url}/checkpoints"
    assert list(tmp_path.iterdir()) == []  # nothing checked or created on the local disk


def test_a_local_workdir_is_an_epath_of_the_directory_given(tmp_path):
    _, workdir = parse("--workdir", str(tmp_path / "run"))
    assert isinstance(workdir, epath.Path)
    assert os.fspath(workdir) == str(tmp_path / "run")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://example.com/runs", r"--workdir http://example.com/runs: not a bucket URL; give "
                                    r"a local directory or gs://BUCKET/PATH"),
        ("gs://", r"--workdir gs://: not a bucket URL"),
        ("gs:///runs", r"--workdir gs:///runs: not a bucket URL"),
        ("gs:/bucket/runs", r"--workdir gs:/bucket/runs: not a bucket URL"),
    ],
)
def test_a_workdir_url_without_a_bucket_is_refused(url, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse("--workdir", url)
    assert "\n" not in str(caught.value)


def test_the_entry_point_refuses_a_workdir_that_is_a_file(tmp_path):
    (tmp_path / "results").write_text("")
    code, stderr = run_cli("sweep", "--workdir", tmp_path / "results")
    assert_one_line(code, stderr, r"^es-jax sweep: --workdir .*/results: is a file")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config.grid=abc"], r"^--config\.grid: 'abc' is not of type float; the key holds a "
         r"tuple of float \(e\.g\. --config\.grid=0\.0,0\.1\)"),
        (["--config.models.minilm.tasks=1"], r"^--config\.models\.minilm\.tasks: 1 is not of "
         r"type str"),
        (["--config.models=abc"], r"^--config\.models: 'models' is a group of keys, not a value; "
         r"set one of its keys, --config\.models\.KEY=VALUE with KEY in \['minilm', 'smollm2'\]"),
        (["--config.seed=1.5"], r"^--config\.seed=1\.5: invalid literal for int\(\) with base 10: "
         r"'1\.5'$"),
        (["--bogus=1"], r"^--bogus=1: unknown flag; the flags are --config FILE\[:variant\]"),
        (["results"], r"^unexpected argument 'results'; every setting is a flag"),
    ],
)
def test_hostile_command_lines_are_one_line_naming_the_argument(tmp_path, argv, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse("--workdir", str(tmp_path), *argv)
    assert "\n" not in str(caught.value)


def test_a_tuple_of_floats_takes_integers(tmp_path):
    config, _ = parse("--workdir", str(tmp_path), "--config.grid=0,0.5")
    assert config.grid == (0, 0.5)


def test_an_unknown_task_suggests_the_close_one(tmp_path):
    code, stderr = run_cli(
        "sweep", "--workdir", tmp_path / "run", "--config.models.minilm.tasks=wordsim"
    )
    assert_one_line(code, stderr, r"unknown task 'wordsim' \(did you mean 'wordsim353'\?\)")


def test_a_missing_model_folder_is_one_line_naming_it(tmp_path):
    code, stderr = run_cli(
        "sweep", "--workdir", tmp_path / "run", f"--config.models.minilm.name={tmp_path}/none"
    )
    assert_one_line(
        code, stderr, rf"^es-jax sweep: Model folder {tmp_path}/none does not exist; expected "
        r"a bundled name \(minilm, smollm2\), a Hugging Face model folder"
    )


def test_a_truncated_config_json_is_one_line_naming_it(tmp_path):
    folder = tmp_path / "minilm"
    folder.mkdir()
    minilm = hub.bundled_location("minilm")
    for name in ("tokenizer.json", "vocab.txt", "model.safetensors"):
        (folder / name).symlink_to(minilm / name)
    (folder / "config.json").write_text((minilm / "config.json").read_text()[:100])
    code, stderr = run_cli(
        "sweep", "--workdir", tmp_path / "run", f"--config.models.minilm.name={folder}"
    )
    assert_one_line(code, stderr, rf"^es-jax sweep: {folder}/config\.json is not valid JSON")


def test_an_os_error_of_a_command_is_one_line_naming_the_path(monkeypatch):
    def full_disk(argv):
        raise OSError(28, "No space left on device", "/runs/a/results.json")

    monkeypatch.setattr(sweep, "main", full_disk)
    with pytest.raises(SystemExit) as caught:
        cli.main(["sweep", "--workdir", "/runs/a"])
    assert caught.value.code == "es-jax sweep: /runs/a/results.json: No space left on device."
