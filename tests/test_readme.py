"""The README's commands run as written (defect 5).

Every `modformer ...` line of the README's ```bash blocks is either run here (through the
CLI's `main`, in a scratch directory that links the repository's `docs/` and `src/`) or
listed in NOT_RUN with the reason. Options appended to a command only shrink it (fewer
steps, less text, smaller batches): argparse takes the last value, so the README's own
arguments are what is being tested. The ```python block is executed as well.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from modformer.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

SHORT_TRAIN = [
    *("--max_steps", "3", "--eval_interval", "0", "--eval_batches", "1", "--log_interval", "1"),
    *("--batch_size", "2", "--grad_accum", "1", "--data.block_size", "32"),
    *("--optim.warmup_steps", "1", "--ckpt_interval", "0", "--progress", "false", "--threads", "1"),
]
SMALL_CORPUS = ["--max-bytes-per-domain", "20000", "--vocab-size", "300", "--no-progress"]
SMALL_USAGE = ["--max-batches", "1", "--block-size", "32"]

# README command -> options appended to make it cheap.
PREPARE = {
    "modformer prepare data/default": SMALL_CORPUS,
    "modformer prepare data/mine --inputs notes='docs/*.md' code='src/**/*.py' --tokenizer byte": [
        "--no-progress"
    ],
    "modformer prepare data/code --inputs code=src/ --suffixes .py --tokenizer data/default/tokenizer": [
        "--no-progress"
    ],
}
TRAIN = {
    "modformer train --config cfg.yaml": SHORT_TRAIN,
    "modformer train --config cfg.yaml --resume": SHORT_TRAIN,
    "modformer export hf runs/tiny exported/gpt2": [],
}
DEMO = {
    "modformer demo --stages vanilla": [
        *("--steps", "3", "--block-size", "32", "--batch-size", "2"),
        *SMALL_CORPUS,
    ],
}
MOM = {
    'modformer convert mom --from runs/demo/vanilla --chunks "[1-2-1]" --config K2H3S models/mom': [],
    "modformer train --model.init_from models/mom --data.dir runs/demo/data --out_dir runs/mom": SHORT_TRAIN,
}
MODULEFORMER = {
    "modformer train --model.arch moduleformer --model.preset tiny --data.dir runs/demo/data --out_dir runs/mf": SHORT_TRAIN,
    "modformer usage runs/mf runs/demo/data --per-domain": SMALL_USAGE,
    "modformer prune runs/mf --data runs/demo/data --threshold 0.3 models/mf_pruned": SMALL_USAGE,
    "modformer extend runs/mf --new-experts 2 models/mf_ext": [],
}
RUN = {**PREPARE, **TRAIN, **DEMO, **MOM, **MODULEFORMER}
NOT_RUN = {
    "torchrun --nproc_per_node 2 -m modformer train --config cfg.yaml": "DDP with tiny settings: "
    "tests/test_train.py::test_ddp_two_cpu_processes_stay_in_sync",
    "torchrun --nproc_per_node 8 -m modformer train --config cfg.yaml --parallel fsdp": "8 "
    "processes; FSDP2 is tested with tiny settings in tests/test_distributed.py",
    "modformer convert gpt2 /path/to/local/gpt2 models/gpt2": "needs a GPT-2 download; "
    "tests/test_gpt.py converts a locally made one",
    "modformer convert mom-official /path/to/official/checkpoint models/mom-official": "needs an "
    "official checkpoint; tests/test_mom_official.py converts the fixtures",
    "modformer convert jetmoe /path/to/local/jetmoe models/jetmoe": "needs a JetMoE download; "
    "tests/test_jetmoe.py converts a locally made one",
    "modformer export hf models/jetmoe exported/jetmoe": "follows the JetMoE conversion above",
    "modformer convert moduleformer /path/to/local/MoLM-350M-4B models/molm": "needs an IBM "
    "checkpoint; tests/test_convert_moduleformer.py converts locally made ones",
    "modformer convert moduleformer SRC DST --history-length 512": "placeholders (the same "
    "conversion with an option)",
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _bash_commands() -> list[list[str]]:
    """Each line of the ```bash blocks as shell words, comments dropped."""
    lines = [line for block in _blocks("bash") for line in block.splitlines()]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def _run(command: str, extra: list[str], capsys) -> str:
    words = shlex.split(command)
    assert words[0] == "modformer"
    code = main([*words[1:], *extra])
    captured = capsys.readouterr()
    assert code == 0, f"README command failed: {command}\n{captured.err[-2000:]}"
    return captured.out


def test_readme_commands_are_run_or_accounted_for():
    listed = {tuple(shlex.split(c)) for c in [*RUN, *NOT_RUN]}
    in_readme = {tuple(words) for words in _bash_commands()}
    missing = [" ".join(c) for c in listed - in_readme]
    assert not missing, f"commands no longer in the README (update this test): {missing}"
    unlisted = [
        " ".join(c) for c in in_readme - listed if c[0] in ("modformer", "torchrun", "python")
    ]
    assert not unlisted, f"README commands this test neither runs nor skips: {unlisted}"


def test_readme_subcommands_exist():
    """Every `modformer SUB` the README mentions anywhere (tables included) is a command."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    mentioned = set(re.findall(r"`modformer ([a-z][a-z0-9-]*)", README))
    assert mentioned - set(subparsers.choices) == set()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch directory that sees the repository's docs/ and src/ and holds the
    README's cfg.yaml."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("docs", "src"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    (yaml_block,) = [b for b in _blocks("yaml") if b.startswith("# cfg.yaml")]
    (work / "cfg.yaml").write_text(yaml_block)
    return work


@pytest.fixture(scope="module")
def default_data(workdir) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert main(["prepare", "data/default", *SMALL_CORPUS]) == 0
    return workdir


@pytest.fixture(scope="module")
def demo_run(workdir) -> Path:
    (command, extra), *_ = DEMO.items()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert main([*shlex.split(command)[1:], *extra]) == 0
    return workdir


def test_readme_prepare_commands(default_data, monkeypatch, capsys):
    monkeypatch.chdir(default_data)
    for command, extra in list(PREPARE.items())[1:]:  # the first made `default_data`
        _run(command, extra, capsys)
    import json

    mine = json.loads((default_data / "data/mine/meta.json").read_text())
    assert set(mine["domains"]) == {"notes", "code"}
    code = json.loads((default_data / "data/code/meta.json").read_text())
    sources = [s["path"] for s in code["sources"]]
    assert sources and all(p.endswith(".py") for p in sources)
    assert code["tokenizer"]["kind"] == "hf"


def test_readme_training_commands(default_data, monkeypatch, capsys):
    monkeypatch.chdir(default_data)
    for command, extra in TRAIN.items():
        _run(command, extra, capsys)
    assert (default_data / "runs/tiny/model/config.json").is_file()
    assert (default_data / "exported/gpt2/config.json").is_file()


def test_readme_mixture_of_modules_commands(demo_run, monkeypatch, capsys):
    monkeypatch.chdir(demo_run)
    for command, extra in MOM.items():
        _run(command, extra, capsys)
    assert (demo_run / "runs/mom/model/config.json").is_file()


def test_readme_moduleformer_commands(demo_run, monkeypatch, capsys):
    monkeypatch.chdir(demo_run)
    for command, extra in MODULEFORMER.items():
        _run(command, extra, capsys)
    assert (demo_run / "models/mf_ext/config.json").is_file()


def test_readme_python_api(tmp_path, monkeypatch):
    """Every ```python block runs, in order, in one directory (the second loads what the
    first saved, with trust_remote_code)."""
    api, remote = _blocks("python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(api, "README.md", "exec"), namespace)  # noqa: S102  (our own README)
    assert type(namespace["model"]).__name__ == "GPTForCausalLM"
    remote_namespace: dict = {}
    exec(compile(remote, "README.md", "exec"), remote_namespace)  # noqa: S102
    assert type(remote_namespace["model"]).__name__ == "GPTForCausalLM"
