"""One command line for every command: config files and variants, typed overrides (lists and
nested keys included), and one clear line for anything wrong, through the real `es-jax` entry."""

import subprocess
import sys
from pathlib import Path

import pytest

import es_jax
from es_jax import cli
from es_jax.commands import command_line, sweep_config
from es_jax.commands.command_line import UsageError

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
