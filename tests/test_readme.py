"""Every command in the README's fenced ``bash`` blocks is run here, so the README cannot rot (issue 6, item 6).

The commands run in the README's order, in one scratch directory, so that later ones find what earlier ones
wrote (``runs/fmnist_demo/checkpoint.pt``, ``data/imagenet_train.beton``). Each command matches exactly one rule
of ``RULES`` below, which says how it is run: as written, on tiny data (the README's own keys and arguments
kept, small sizes appended), with ``--print-config`` / ``DRY_RUN=1`` where the real run needs GPUs or days, or
not at all where the command is this very suite. A README command that matches no rule fails the test: a new
command must be given a way to be run.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from digits_fixture import make_digit_folder
from imagefolder_fixture import make_imagefolder
from typer.testing import CliRunner

from paws_cli.cli import app
from paws_cli.data.datasets.fmnist import find_fashion_mnist
from paws_cli.data.splits.files import official_split, split_entry_class

pytestmark = pytest.mark.slow  # tiny trainings, a conversion and a few subprocesses: about a minute

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^\s*```(\S*)\s*$")
IMAGENET_PLACEHOLDER = "/data/imagenet"
HAS_FFCV = importlib.util.find_spec("ffcv") is not None


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command line of the ```bash blocks, comments and continuations removed."""
    commands: list[tuple[int, str]] = []
    in_bash = False
    pending: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            in_bash = not in_bash and fence.group(1) == "bash" if not in_bash else False
            continue
        if not in_bash:
            continue
        body = line.strip()
        if pending is not None:
            start, head = pending
            body = f"{head} {body}"
            number = start
            pending = None
        if body.endswith("\\"):
            pending = (number, body[:-1].strip())
            continue
        words = shlex.split(body, comments=True)
        if words:
            commands.append((number, shlex.join(words)))
    return commands


# ------------------------------------------------------------------------------------------------ the scratch space


@dataclass
class Workspace:
    """The scratch directory the commands run in, and the tiny data that stands in for the real data."""

    cwd: Path
    tiny_dataset: Path
    imagenet: Path
    log: list[str]


def _tiny(ws: Workspace) -> list[str]:
    """Small sizes on the tiny array dataset (tests/conftest.py): one epoch is 16 steps of 16 images."""
    return [
        "data.dataset=array",
        f"data.path={ws.tiny_dataset}",
        "data.labels_per_class=4",
        "augment.large_size=16",
        "augment.small_size=8",
        "augment.num_small=2",
        "paws.classes_per_batch=4",
        "paws.images_per_class=2",
        "supervised.classes_per_batch=4",
        "supervised.images_per_class=2",
        "semppl.labelled_batch.classes_per_batch=4",  # the demo's SemPPL run on the 4-class tiny dataset
        "semppl.queue_size=64",
        "semppl.num_negatives=6",
        "optim.batch_size=16",
        "optim.epochs=1",
        "optim.warmup_epochs=0.25",
        "model.proj_hidden_dim=32",
        "model.proj_out_dim=32",
        "model.channels_last=false",
        "run.precision=fp32",
        "run.device=cpu",
        "run.num_threads=1",
        "run.progress=false",
        "run.max_steps=20",  # the tiny dataset's epoch is 16 steps; Fashion-MNIST's would be 3,750
        "finetune.epochs=2",
    ]


def _tiny_imagenet() -> list[str]:
    """Small sizes for the ImageNet recipes on the 3-class generated folder; 3 steps of pretraining."""
    return [
        "augment.large_size=32",
        "augment.small_size=16",
        "augment.num_small=2",
        "paws.classes_per_batch=3",
        "paws.images_per_class=2",
        "optim.batch_size=8",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "model.proj_hidden_dim=64",
        "model.proj_out_dim=64",
        "model.pred_hidden_dim=32",
        "data.num_workers=1",
        "eval.batch_size=64",
        "finetune.epochs=1",
        "finetune.batch_size=32",
        "run.max_steps=3",
        "run.precision=fp32",
        "run.device=cpu",
        "run.num_threads=2",
        "run.progress=false",
    ]


def _keep_readme_keys(readme_args: list[str], extra: list[str]) -> list[str]:
    """readme_args + the extra overrides whose keys the README command does not set itself (a length the README
    gives in steps also drops the extra one in epochs: one layer may not give both)."""
    given = {a.split("=", 1)[0] for a in readme_args if "=" in a and not a.startswith("-")}
    for steps, epochs in (
        ("optim.total_steps", "optim.epochs"),
        ("optim.warmup_steps", "optim.warmup_epochs"),
    ):
        if steps in given:
            given.add(epochs)
    return [*readme_args, *(e for e in extra if e.split("=", 1)[0] not in given)]


def _paws(ws: Workspace, words: list[str]) -> str:
    """Run `paws ...` in-process in the scratch directory; the output, after asserting exit code 0."""
    assert words[0] == "paws", words
    result = CliRunner().invoke(app, words[1:])
    output = result.output  # click 8.2+: stdout and stderr together
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, f"`{shlex.join(words)}` exited {result.exit_code}:\n{output}"
    return output


def _shell(ws: Workspace, words: list[str], *, cwd: Path, timeout: float = 300) -> str:
    done = subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"`{shlex.join(words)}` exited {done.returncode}:\n{output[-4000:]}"
    return output


def _make(ws: Workspace, words: list[str], *, dry: bool) -> str:
    """`make TARGET VAR=...` in the repository, with this interpreter's bin/ and without re-running set-up."""
    words = [w.replace(IMAGENET_PLACEHOLDER, str(ws.imagenet)) for w in words]
    bin_dir = str(Path(sys.executable).parent)
    base = ["make", "--no-print-directory", "-o", ".venv/.paws-setup-stamp", f"BIN={bin_dir}"]
    if dry:  # what make would run: the expansion is checked, the command itself runs elsewhere
        return _shell(ws, [*base, "-n", *words[1:]], cwd=REPO)
    return _shell(ws, [*base, *words[1:], f"REPORTS={ws.cwd / 'reports'}"], cwd=REPO)


# ------------------------------------------------------------------------------------------------------- the rules


def run_as_written(ws: Workspace, words: list[str]) -> str:
    return _paws(ws, words)


def run_on_tiny_data(ws: Workspace, words: list[str]) -> str:
    """pretrain / demo / knn-eval / finetune: the README's keys kept, tiny sizes appended."""
    return _paws(ws, _keep_readme_keys(words, _tiny(ws)))


def sweep_on_tiny_data(ws: Workspace, words: list[str]) -> str:
    """`paws sweep`: the README's axes kept, tiny sizes appended as fixed keys, and a validation split that the
    tiny dataset holds (20 of each class's 60 images outside the labelled subset)."""
    return _paws(ws, _keep_readme_keys(words, [*_tiny(ws), "eval.val_images=80"]))


def convert_fashion_mnist(ws: Workspace, words: list[str]) -> str:
    try:
        find_fashion_mnist(None)
    except FileNotFoundError:  # no Debian package here: the tiny array dataset stands in for it
        shutil.copytree(ws.tiny_dataset, ws.cwd / words[-1])
        return "dataset-fashion-mnist not installed: the tiny dataset stands in"
    return _paws(ws, words)


def convert_own_images(ws: Workspace, words: list[str]) -> str:
    """README "Your own dataset": a small generated folder of digit PNGs (train/, test/) stands in for yours."""
    make_digit_folder(ws.cwd / "my_digits", per_class=16, test_per_class=4)
    output = _paws(ws, words)
    assert "160 train / 40 test images, 10 classes" in output, output
    return output


def run_on_tiny_imagenet(ws: Workspace, words: list[str]) -> str:
    """ImageNet commands on a generated 3-class folder holding real official file names."""
    if not HAS_FFCV and any("beton" in w for w in words):
        return "skipped: FFCV is not installed"
    words = [w.replace(IMAGENET_PLACEHOLDER, str(ws.imagenet)) for w in words]
    if words[1] == "make-splits":
        return _paws(ws, [*words, "--dataset-classes-only"])  # 3 of ImageNet's 1000 classes
    if words[1] == "convert-dataset":
        return _paws(ws, words)
    return _paws(ws, _keep_readme_keys(words, _tiny_imagenet()))


def resolve_settings_only(ws: Workspace, words: list[str]) -> str:
    """GPU / many-GPU / SLURM runs: the settings they give must resolve; the launched paths have their own tests
    (tests/test_speed_switches.py, test_distributed.py::test_torchrun_launches_pretrain, test_slurm.py)."""
    if not HAS_FFCV and any("beton" in w for w in words):
        return "skipped: FFCV is not installed"
    if words[0] == "torchrun":
        words = ["paws", *words[words.index("paws_cli") + 1 :]]
    output = _paws(ws, [*words, "--print-config"])
    for word in words[2:]:
        if "=" in word and not word.startswith("-"):
            key, value = word.split("=", 1)
            assert f"{key.split('.')[-1]}: {value}".lower() in output.lower(), (word, output)
    return output


def make_for_real(ws: Workspace, words: list[str]) -> str:
    return _make(ws, words, dry=False)


def make_imagenet_dry_run(ws: Workspace, words: list[str]) -> str:
    """`make reproduce-tableN IMAGENET=...`: the plan for the generated folder (training it would take weeks)."""
    output = _make(ws, [*words, "DRY_RUN=1"], dry=False)
    assert "dry run: nothing was run" in output and str(ws.imagenet) in output, output
    return output


def make_expansion_covered_by(test: str) -> Callable[[Workspace, list[str]], str]:
    """A make target whose command another test runs end to end: check what make runs, and that the test exists."""

    def check(ws: Workspace, words: list[str]) -> str:
        output = _make(ws, words, dry=True)
        file, name = test.split("::")
        assert f"def {name}(" in (REPO / "tests" / file).read_text(), f"{test} no longer exists"
        return output

    return check


def benchmark_briefly(ws: Workspace, words: list[str]) -> str:
    """A benchmark with its smallest sizes: it must run and print figures (the numbers are not checked)."""
    script = Path(words[1]).name
    short = {
        "train_step.py": ["--steps", "2", "--warmup", "1", *_tiny(ws)],
        # the SemPPL demo recipe draws 63 negatives from a batch of 74: a quarter batch needs fewer
        "step.py": ["--steps", "2", "--warmup", "1", "--batch-scale", "0.25", "semppl.num_negatives=8"],
        "loader.py": [
            "--classes",
            "2",
            "--per-class",
            "4",
            "--batch",
            "4",
            "--support-classes",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        "knn_memory.py": [],
    }[script]
    if script == "loader.py" and not HAS_FFCV:
        return "skipped: FFCV is not installed"
    return _shell(ws, [sys.executable, str(REPO / words[1]), *words[2:], *short], cwd=ws.cwd)


def this_suite(ws: Workspace, words: list[str]) -> str:
    """`make test` and the pytest command are this very suite (CI runs `make test`); `make demo`'s command
    (`paws demo --recipe fmnist_demo`) runs above on tiny data and its 10-minute run is measured, not tested."""
    if words[:2] == ["make", "demo"] or words[:2] == ["make", "demo-60pc"]:
        return _make(ws, words, dry=True)
    return "not run: it is this test suite"


RULES: list[tuple[str, Callable[[Workspace, list[str]], str]]] = [
    (r"^make (test|demo|demo-60pc)$", this_suite),
    (r"^\S*python -m pytest\b", this_suite),
    (r"^make reproduce-table[12] DRY_RUN=1$", make_for_real),
    (
        r"^make reproduce-table1 SCALE=smoke$",
        make_expansion_covered_by("test_reproduce.py::test_smoke_table1_end_to_end_resumable"),
    ),
    (r"^make reproduce-table[12] IMAGENET=", make_imagenet_dry_run),
    (r"^\S*python benchmarks/\w+\.py\b", benchmark_briefly),
    (r"^paws (recipes|settings)\b", run_as_written),
    (r"^paws pretrain .*--print-config", run_as_written),
    (r"^paws convert-dataset fashion-mnist\b", convert_fashion_mnist),
    (r"^paws make-splits data/fmnist\b", run_as_written),
    (r"^paws convert-dataset images my_digits/", convert_own_images),
    (r"^paws make-splits data/my_digits\b", run_as_written),
    (r"^paws export runs/", run_as_written),
    (r"run\.device=cuda|^torchrun |run\.launcher=slurm", resolve_settings_only),
    (rf"{IMAGENET_PLACEHOLDER}|imagenet_train\.beton|runs/r50_10pct/", run_on_tiny_imagenet),
    (r"^paws (pretrain|demo|knn-eval|finetune) ", run_on_tiny_data),
    (r"^paws sweep ", sweep_on_tiny_data),
    (r"^paws report ", run_as_written),
]


def rule_for(command: str) -> Callable[[Workspace, list[str]], str]:
    matches = [action for pattern, action in RULES if re.search(pattern, command)]
    assert matches, f"README command `{command}` matches no rule of tests/test_readme.py: say how to run it"
    return matches[0]


# ------------------------------------------------------------------------------------------------------- the tests


def test_readme_parser_reads_blocks_comments_and_continuations() -> None:
    text = "x\n```bash\nmake demo  # set-up\n# only a comment\npaws a \\\n  b=1 'c d'\n```\n```text\nnot me\n```\n"
    assert readme_commands(text) == [(3, "make demo"), (5, "paws a b=1 'c d'")]


def test_every_readme_command_has_a_rule() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) >= 30, "the README's command blocks were not found"
    for _, command in commands:
        rule_for(command)


@pytest.fixture()
def workspace(tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    # Real JPEGs under ImageNet's file names: the official 1%, 10% and val.txt entries of three classes.
    lists = [official_split(name).ids for name in ("1%", "10%", "val")]
    classes = sorted({split_entry_class(n) for n in lists[0]})[:3]
    names = sorted({n for ids in lists for n in ids if split_entry_class(n) in classes})
    imagenet = make_imagefolder(tmp_path / "imagenet", file_names=names, size=(48, 40), val_per_class=4)
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return Workspace(cwd, tiny_dataset, imagenet, [])


def test_every_readme_command_runs(workspace: Workspace) -> None:
    for number, command in readme_commands(README.read_text()):
        action = rule_for(command)
        started = time.perf_counter()
        try:
            output = action(workspace, shlex.split(command))
        except AssertionError as exc:
            raise AssertionError(
                f"README.md:{number}: `{command}` ({action.__name__}) failed: {exc}"
            ) from None
        seconds = time.perf_counter() - started
        workspace.log.append(f"{seconds:6.1f} s  README.md:{number} [{action.__name__}] {command}")
        assert isinstance(output, str)
    print("\n".join(workspace.log))  # which README command costs what (pytest -s)
    ws = workspace.cwd
    # what the commands claim to write is there
    assert (ws / "runs" / "fmnist_demo" / "knn_eval.json").is_file()
    # "Your own dataset": the demo ran on the converted folder, recorded as what it is
    assert (ws / "runs" / "my_digits" / "demo_results.json").is_file()
    assert "dataset: array" in (ws / "runs" / "my_digits" / "resolved_config.yaml").read_text()
    assert (ws / "runs" / "probe" / "finetune.json").is_file()
    assert (ws / "backbone.safetensors").is_file()
    assert (ws / "splits" / "fmnist10" / "labelled.txt").is_file()
    assert (ws / "runs" / "lr05_again" / "resolved_config.yaml").is_file()
    assert (ws / "runs" / "fmnist_demo" / "report" / "index.html").is_file()
    assert (ws / "reports" / "lr" / "lr.png").is_file()
    assert list((ws / "runs" / "tb").glob("events.out.tfevents.*"))
    if HAS_FFCV:
        assert (ws / "data" / "imagenet_train.beton.index.json").is_file()
        assert (ws / "runs" / "r50_10pct" / "knn_eval.json").is_file()
