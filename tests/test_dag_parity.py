"""Snakemake and DVC must run the same `shrinkflow` commands (DESIGN.md section 1)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from functools import reduce
from pathlib import Path

import pytest
import yaml
from projects import BIN, ROOT, copy_checkout, job_counts, make_project, tool_env

from shrinkflow.config import merge


def snakemake_commands(*extra: str, cwd: Path) -> list[str]:
    """The shell commands of every job, from a forced dry run (`snakemake -n -p --forceall`)."""
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "-p", "--forceall", "--cores", "2", *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    commands = re.findall(r"^Shell command: (shrinkflow .*)$", result.stdout, re.MULTILINE)
    # Snakemake sends each job's stderr to its log file; DVC leaves it on the terminal.
    return sorted(re.sub(r" 2> \S+$", "", c) for c in commands)


def snakemake_jobs(cwd: Path) -> dict[str, dict]:
    """Every job Snakemake plans with --forceall, by command: inputs, outputs, params keys."""
    result = subprocess.run(
        [str(BIN / "python"), str(Path(__file__).with_name("snakemake_jobs.py"))],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {job["command"]: job for job in json.loads(result.stdout)}


def dvc_jobs(cwd: Path) -> dict[str, dict]:
    """Every stage DVC resolves (after matrix expansion and templating), by command: its data
    inputs, code dependencies, outputs (metrics included) and params keys."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    jobs = {}
    with Repo(str(cwd)) as repo:
        for stage in repo.index.stages:
            deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            params = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
            jobs[" ".join(stage.cmd.split())] = {
                "stage": stage.name.split("@")[0],
                "inputs": sorted(d for d in deps if not d.startswith("src/")),
                "code": sorted(d for d in deps if d.startswith("src/")),
                "outputs": sorted(o.def_path for o in stage.outs),
                "params": sorted(params),
            }
    return jobs


def dvc_commands(cwd: Path) -> list[str]:
    """The resolved `cmd` of every stage (after matrix expansion and templating)."""
    return sorted(dvc_jobs(cwd))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _covered(key: str, keys: list[str]) -> bool:
    """A params key read (`train.batch_size`) is tracked by itself or its section (`train`)."""
    return any(_within(key.replace(".", "/"), k.replace(".", "/")) for k in keys)


def graph_differences(cwd: Path) -> list[str]:
    """Where the two tools' graphs disagree, job by job (empty when they agree).

    The same commands; each Snakemake input (output) lies in a DVC dependency (output) and each
    DVC data dependency (output) holds a Snakemake one: DVC names a folder (results/models)
    where Snakemake lists the files in it. A Snakemake job's `params:` hold exactly the
    keys the stage table says the job reads (its method family's included), and DVC tracks
    them; a DVC stage tracks exactly the keys some job of the stage may read (DVC cannot pick
    per method). DVC's code dependencies are those the stage table gives (tests below).
    """
    from shrinkflow.stage_table import stage

    smk, dvc = snakemake_jobs(cwd), dvc_jobs(cwd)
    problems = [f"only Snakemake runs: {c}" for c in sorted(set(smk) - set(dvc))]
    problems += [f"only DVC runs: {c}" for c in sorted(set(dvc) - set(smk))]
    for command in sorted(set(smk) & set(dvc)):
        s, d = smk[command], dvc[command]
        for kind in ("inputs", "outputs"):
            for path in s[kind]:
                if not any(_within(path, p) for p in d[kind]):
                    problems.append(f"{command}: DVC lacks the {kind[:-1]} {path}")
            for path in d[kind]:
                if not any(_within(p, path) for p in s[kind]):
                    problems.append(f"{command}: Snakemake lacks the {kind[:-1]} {path}")
        reads = stage(s["rule"]).params_of(s["wildcards"])
        for key in sorted(set(reads) ^ set(s["params"])):
            problems.append(f"{command}: Snakemake's params miss or add the key {key}")
        for key in s["params"]:
            if not _covered(key, d["params"]):
                problems.append(f"{command}: DVC does not track the params key {key}")
    for d in dvc.values():
        # a per-backend stage (`quantize_finetuned_torch`) of a FLOAT_NODES alternative
        name = re.sub(r"_(torch|tensorflow)$", "", d["stage"]).removesuffix("_finetuned")
        for key in sorted(set(stage(name).all_params()) ^ set(d["params"])):
            problems.append(f"{d['stage']}: DVC's params miss or add the key {key}")
    return sorted(set(problems))


def stage_counts(commands: list[str]) -> dict[str, int]:
    """Jobs per `shrinkflow` sub-command; evaluate of a quantized node counts as its own kind."""
    kinds = ["evaluate_quantized" if " --reference " in c else c.split()[1] for c in commands]
    return {kind: kinds.count(kind) for kind in kinds}


def project_copy(dest: Path, **params: object) -> Path:
    """The workflow files in ``dest``, with ``params`` merged over params.yaml (as a preset)."""
    copy_checkout(dest, ("Snakefile", "dvc.yaml", "workflow", ".dvc", "src"))
    cfg = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), params)
    (dest / "params.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workflow files with params.yaml as committed, in a git repository of their own: the
    dry runs (and DVC, which adds .gitignore entries when it opens a repository) leave the real
    checkout alone, whatever its state and whatever runs there at the same time."""
    project = project_copy(tmp_path_factory.mktemp("checkout"))
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    return project


def same_graph(cwd: Path) -> list[str]:
    """The commands of the DAG, after checking that both tools plan the same graph."""
    assert graph_differences(cwd) == []
    return dvc_commands(cwd)


def test_snakemake_and_dvc_plan_the_same_graph(checkout):
    smk = same_graph(checkout)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["backends"] == ["torch", "tensorflow"], "the default DAG runs both backends"
    points = len(params["prune"]["methods"]) * len(params["prune"]["sparsities"])
    quantized = (1 + points) * len(params["quantize"]["methods"])
    assert quantized > 0, "the default params should exercise quantization"
    assert stage_counts(smk) == {
        "download": 1,
        "prepare": 1,
        "train": 2,
        "sensitivity": 2,
        "prune": 2 * points,
        "finetune": 2 * points,
        "quantize": 2 * quantized,
        "evaluate": 2 * (1 + points),
        "evaluate_quantized": 2 * quantized,
        "summarize": 1,
        "report": 1,
    }
    for backend in ("torch", "tensorflow"):
        assert any(f"--backend {backend} " in c for c in smk)
        assert sum(f"results/models/{backend}/" in c for c in smk) > 1 + points


def test_every_job_computes_with_one_thread(tmp_path):
    """Each job's threads (Snakemake passes them as OMP_NUM_THREADS): one, so that on 2 cores
    two jobs run side by side, training ones included (stage_table.JOB_THREADS)."""
    project = make_project(tmp_path, quantize_methods=["static_int8", "qat_int8"])
    jobs = snakemake_jobs(project).values()
    assert {job["rule"] for job in jobs} >= {"train", "finetune", "prune", "quantize", "evaluate"}
    assert {job["threads"] for job in jobs} == {1}


def test_parity_holds_for_a_sweep_over_models(tmp_path):
    """Both expand backends x models from params.yaml; a second model adds the same jobs."""
    project = project_copy(tmp_path, models=["resnet20", "resnet56"])
    smk = same_graph(project)
    assert sum(" train " in f" {c} " for c in smk) == 2 * 2  # both backends
    assert any("--backend tensorflow --model resnet56" in c for c in smk)


def test_parity_holds_for_two_training_seeds(tmp_path):
    """Both expand seeds like backends and models: every job after prepare runs once per seed,
    in that seed's folder, on the one prepared split."""
    project = project_copy(
        tmp_path,
        seeds=[0, 1],
        backends=["torch"],
        prune={"methods": ["l1_unstructured"], "sparsities": [0.5]},
        quantize={"methods": ["fixed_w8"]},
    )
    smk = same_graph(project)
    counts = stage_counts(smk)
    assert (counts["download"], counts["prepare"], counts["summarize"]) == (1, 1, 1)
    for kind in ("train", "sensitivity", "prune", "finetune"):
        assert counts[kind] == 2, kind
    for kind in ("evaluate", "quantize", "evaluate_quantized"):  # the baseline and 1 point
        assert counts[kind] == 2 * 2, kind
    trains = [c for c in smk if c.split()[1] == "train"]
    for seed in (0, 1):
        assert any(f" --seed {seed} " in c and f"/seed{seed}/baseline/model" in c for c in trains)
        later = [c for c in smk if f"/seed{seed}/" in c and c.split()[1] not in ("train",)]
        assert all(f"/seed{1 - seed}/" not in c for c in later)
        # sensitivity, prune, finetune; evaluate, quantize, evaluate_quantized of 2 sources
        assert len(later) == 3 + 3 * 2


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_parity_holds_for_every_preset(tmp_path, preset):
    """DVC reads only params.yaml, so the preset is merged into it there."""
    project = project_copy(tmp_path, **yaml.safe_load(preset.read_text()))
    smk = same_graph(project)
    cfg = yaml.safe_load((project / "params.yaml").read_text())
    points = len(cfg["prune"]["methods"]) * len(cfg["prune"]["sparsities"])
    quantized = len(cfg["models"]) * (1 + points) * len(cfg["quantize"]["methods"])
    assert stage_counts(smk).get("quantize", 0) == len(cfg["backends"]) * quantized


def test_quantized_nodes_have_the_same_commands_in_both(tmp_path):
    """Every source (baseline, each fine-tuned point) x quantize method is quantized and then
    evaluated against its source, by both tools, with the folders of shrinkflow.dag."""
    from shrinkflow import dag

    project = project_copy(
        tmp_path,
        prune={"methods": ["l1_unstructured"], "sparsities": [0.5]},
        quantize={"methods": ["static_int8", "fixed_w6"]},
    )
    smk = same_graph(project)
    cfg = yaml.safe_load((project / "params.yaml").read_text())
    quantized = [n for n in dag.evaluated_nodes(cfg) if n.stage == "quantized"]
    assert len(quantized) == 2 * 4  # both backends
    expected_quantize = sorted(
        f"shrinkflow quantize --params params.yaml --method {n.quant_method} "
        f"--in {n.source.model_dir} --data data/prepared/digits "
        f"--teacher {dag.baseline(n.backend, n.model, n.seed).model_dir} --out {n.model_dir}"
        for n in quantized
    )
    expected_evaluate = sorted(
        f"shrinkflow evaluate --params params.yaml --in {n.model_dir} "
        f"--reference {n.source.model_dir} --data data/prepared/digits --out {n.metrics}"
        for n in quantized
    )
    assert [c for c in smk if c.split()[1] == "quantize"] == expected_quantize
    assert [c for c in smk if " --reference " in c] == expected_evaluate
    # unquantized nodes keep the plain evaluate command (never a --reference)
    plain = [c for c in smk if c.split()[1] == "evaluate" and " --reference " not in c]
    assert len(plain) == 2 * 2 and not any("/quantized/" in c for c in plain)


def test_an_empty_method_list_turns_quantization_off_in_both(tmp_path):
    """`quantize.methods: []` is an empty DVC matrix, which DVC expands to no stages."""
    project = project_copy(tmp_path, quantize={"methods": []})
    smk = same_graph(project)
    counts = stage_counts(smk)
    assert "quantize" not in counts and "evaluate_quantized" not in counts
    assert counts["finetune"] > 0


def test_per_backend_lists_build_the_same_jobs_in_both(tmp_path):
    """A method one backend lacks (float16, a TFLite conversion) and a model listed for one
    backend only: per-backend lists in params.yaml, one DVC stage per backend where a matrix
    spans them (dvc.yaml rewritten for that shape), the same jobs as Snakemake's."""
    from shrinkflow import dag
    from shrinkflow.config import load_params

    project = project_copy(
        tmp_path,
        models={"torch": ["resnet20", "resnet32"], "tensorflow": ["resnet20"]},
        prune={"methods": ["l1_unstructured"], "sparsities": [0.5]},
        quantize={"methods": {"torch": ["fixed_w8"], "tensorflow": ["fixed_w8", "float16"]}},
    )
    stale = run_cli(project, "validate")
    assert "dvc.yaml is not what `shrinkflow dvc-yaml` writes" in stale.stdout
    assert run_cli(project, "dvc-yaml").stdout.strip() == "dvc.yaml: written from the stage table"
    assert "note:" not in run_cli(project, "validate").stdout
    smk = same_graph(project)
    counts = stage_counts(smk)
    # torch: 2 models x (baseline + 1 point) x 1 method; tensorflow: 1 x 2 x 2
    assert counts["train"] == 3 and counts["quantize"] == 2 * 2 + 2 * 2
    assert not any("--method float16" in c and "/torch/" in c for c in smk)
    assert not any("/tensorflow/resnet32/" in c for c in smk)
    with contextlib.chdir(project):  # custom_models and the tracking URI resolve there
        cfg = load_params([project / "params.yaml"])
    assert len(dag.evaluated_nodes(cfg)) == counts["evaluate"] + counts["evaluate_quantized"]
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert stages["train_torch"]["matrix"]["model"] == "${models.torch}"
    assert stages["quantize_finetuned_tensorflow"]["matrix"]["qmethod"] == (
        "${quantize.methods.tensorflow}"
    )
    assert stages["prune_torch"]["matrix"]["method"] == "${prune.methods}"  # one list
    assert "prepare" in stages and "summarize" in stages  # no backend in their matrix


def run_cli(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "shrinkflow"), *args], cwd=cwd, capture_output=True, text=True
    )
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def test_committed_dvc_yaml_is_what_the_stage_table_writes(tmp_path):
    """dvc.yaml is generated (`shrinkflow dvc-yaml`); `--check` fails on a stale one."""
    from shrinkflow import dvc_yaml

    rendered = dvc_yaml.render_project(ROOT)
    assert (ROOT / "dvc.yaml").read_text() == rendered, "run `shrinkflow dvc-yaml`"
    stale = tmp_path / "dvc.yaml"
    stale.write_text(rendered.replace("    - prune.exclude\n", "", 1))
    check = subprocess.run(
        [str(BIN / "shrinkflow"), "dvc-yaml", "--check", "--out", str(stale)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1
    assert check.stderr.strip() == (
        f"error: {stale} is not what `shrinkflow dvc-yaml` writes: run it"
    )


def test_dvc_tracks_the_code_each_stage_imports(checkout):
    """A stage depends on the CLI, its stage module, every shrinkflow module they import and
    (a backend job) its backend's folder; not on the code of stages it never runs."""
    code = {}
    for job in dvc_jobs(checkout).values():
        code.setdefault(job["stage"], set()).update(job["code"])
    src = "src/shrinkflow/"
    for stage in ("train", "finetune", "prune", "quantize", "evaluate", "sensitivity"):
        assert {f"{src}cli.py", f"{src}config.py", f"{src}stages/{stage.split('_')[0]}.py"} <= (
            code[stage]
        )
        assert any(p.startswith(f"{src}backends/torch") for p in code[stage]), stage
    for stage in ("train", "finetune", "prune", "quantize"):  # the shared training code
        assert any(p.startswith(f"{src}training") for p in code[stage]), stage
    assert f"{src}report/templates" in code["report"]
    assert not any(p.startswith(f"{src}backends/t") for p in code["report"])  # no framework
    assert not any(p.startswith(f"{src}stages/train") for p in code["evaluate"])


def test_the_graph_check_sees_a_dep_or_params_key_missing_on_one_side(checkout, tmp_path):
    """Drop one DVC dependency, then one Snakemake params key: each is reported."""
    project = project_copy(tmp_path / "project")
    dvc_file = project / "dvc.yaml"
    head, prune = dvc_file.read_text().split("\n  prune:\n")
    sensitivity = (
        "    - results/models/${item.backend}/${item.model}/seed${item.seed}/sensitivity\n"
    )
    dvc_file.write_text(f"{head}\n  prune:\n" + prune.replace(sensitivity, "", 1))
    missing = graph_differences(project)
    assert any("DVC lacks the input" in p and "/sensitivity" in p for p in missing)
    shutil.copy(ROOT / "dvc.yaml", dvc_file)
    rules = project / "workflow" / "rules" / "prune.smk"
    rules.write_text(
        rules.read_text().replace('shrinkflow=TABLE["finetune"].params', "other={}", 1)
    )
    assert any(
        "Snakemake's params miss or add the key finetune" in p for p in graph_differences(project)
    )


def test_configfile_reaches_every_job(tmp_path, checkout):
    preset = tmp_path / "preset.yaml"
    preset.write_text("train: {epochs: 1}\n")
    commands = snakemake_commands("--configfile", str(preset), cwd=checkout)
    assert commands
    assert all(f"--params params.yaml --params {preset}" in c for c in commands)


def test_config_overrides_are_validated_and_forwarded(checkout):
    """`snakemake --config seed=3` reaches every job as `--set`; bad values stop it at start-up."""
    commands = snakemake_commands("--config", "seed=3", "models=[resnet56]", cwd=checkout)
    assert all("--set seed=3 --set 'models=[resnet56]'" in c for c in commands)
    assert any("--model resnet56" in c for c in commands)
    bad = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "1", "--config", "seed=-1"],
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "error: seed: -1 is not in [0, 4294967295]" in bad.stdout + bad.stderr


def test_every_command_is_a_valid_cli_invocation(checkout):
    """Each command parses: `--help` appended must succeed (catches renamed options). DVC's
    commands are the same (test_snakemake_and_dvc_plan_the_same_graph)."""
    commands = dvc_commands(cwd=checkout)
    options: dict[str, set[str]] = {}  # one `--help` per sub-command: the DAG has dozens of jobs
    for command in commands:
        words = command.split()
        options.setdefault(words[1], set()).update(w for w in words if w.startswith("--"))
    for stage, used in options.items():
        help_run = subprocess.run(
            [str(BIN / "shrinkflow"), stage, "--help"], capture_output=True, text=True
        )
        assert help_run.returncode == 0, help_run.stderr
        for option in sorted(used):
            assert option in help_run.stdout, f"{option} not an option of `{stage}`"


# Stands in for `shrinkflow` so the workflow can "run" in seconds: it creates what --out names
# (a file for metrics and the summary, a folder otherwise; the report's files), which is all
# Snakemake checks.
FAKE_CLI = """#!/bin/sh
stage=$1 out=""
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
case "$stage:$out" in
  report:*) mkdir -p "$out/figures" && touch "$out/index.html" "$out/report.md" \
    "$out/nodes.csv" "$out/selection.json" "$out/metrics.json" ;;
  *.json|*.csv) mkdir -p "$(dirname "$out")" && : > "$out" ;;
  *) mkdir -p "$out" ;;
esac
"""


@pytest.mark.parametrize(
    ("change", "rerun"),
    [
        ("quantize: {qat: {lr: 0.01}}", ["qat_int8"]),
        # fixed-point weights calibrate nothing: fixed_w4 re-runs for neither change
        ("quantize: {calibration_batches: 2}", ["static_int8", "qat_int8"]),
    ],
)
def test_a_changed_quantize_setting_reruns_only_the_methods_that_read_it(tmp_path, change, rerun):
    """Each quantize job's `params:` holds exactly the config its method reads."""
    project = project_copy(
        tmp_path / "project",
        backends=["torch"],
        prune={"methods": ["l1_unstructured"], "sparsities": [0.5]},
        quantize={"methods": ["static_int8", "qat_int8", "fixed_w4"]},
    )
    env = _fake_cli(tmp_path)
    snakemake = [str(BIN / "snakemake"), "--cores", "2"]
    done = subprocess.run(snakemake, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "change.yaml").write_text(change + "\n")
    dry = subprocess.run(
        [*snakemake, "-n", "--configfile", str(tmp_path / "change.yaml")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    sources = 2  # the baseline and the one fine-tuned point
    assert job_counts(dry.stdout) == {
        "quantize": sources * len(rerun),
        "evaluate_quantized": sources * len(rerun),
        "summarize": 1,
        "report": 1,
        "all": 1,
    }
    for method in rerun:
        assert f"quantized/{method}/baseline/model" in dry.stdout


def _fake_cli(folder: Path) -> dict[str, str]:
    """The environment of a tool run with FAKE_CLI as its `shrinkflow`."""
    fake = folder / "bin" / "shrinkflow"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_CLI)
    fake.chmod(0o755)
    env = tool_env()
    env["PATH"] = f"{fake.parent}:{env['PATH']}"
    return env


# A small sweep for the seed tests: one backend, one pruning point, one quantize method.
SMALL_SWEEP = {
    "backends": ["torch"],
    "prune": {"methods": ["l1_unstructured"], "sparsities": [0.5]},
    "quantize": {"methods": ["fixed_w8"]},
}


def test_adding_a_seed_runs_only_its_jobs_in_snakemake(tmp_path):
    """With seed 0's outputs in place and up to date, `seeds: [0, 1]` plans seed 1's chain and
    the two jobs that list every node (summarize, report), nothing of seed 0."""
    project = project_copy(tmp_path / "project", **SMALL_SWEEP)
    env = _fake_cli(tmp_path)
    snakemake = [str(BIN / "snakemake"), "--cores", "2"]
    done = subprocess.run(snakemake, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "seeds.yaml").write_text("seeds: [0, 1]\n")
    dry = subprocess.run(
        [*snakemake, "-n", "-p", "--configfile", str(tmp_path / "seeds.yaml")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert job_counts(dry.stdout) == {
        "train": 1,
        "sensitivity": 1,
        "prune": 1,
        "finetune": 1,
        "quantize": 2,
        "evaluate": 2,
        "evaluate_quantized": 2,
        "summarize": 1,
        "report": 1,
        "all": 1,
    }
    commands = re.findall(r"^Shell command: (shrinkflow .*)$", dry.stdout, re.MULTILINE)
    assert len(commands) == 12
    assert not any("/seed0/" in c for c in commands)
    assert sum("/seed1/" in c for c in commands) == 10  # all but summarize and report


def _dvc_stages(cwd: Path) -> dict[str, dict]:
    """Every stage DVC resolves, by name: its command, dependencies, params keys and their
    values in params.yaml, and outputs: what `dvc repro` compares with dvc.lock."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    cfg = yaml.safe_load((cwd / "params.yaml").read_text())

    def value(key: str) -> object:
        return reduce(lambda section, part: section[part], key.split("."), cfg)

    stages = {}
    with Repo(str(cwd)) as repo:
        for stage in repo.index.stages:
            params = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
            stages[stage.name] = {
                "cmd": stage.cmd,
                "deps": [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)],
                "params": {key: value(key) for key in params},
                "outs": [o.def_path for o in stage.outs],
            }
    return stages


def test_adding_a_seed_leaves_every_dvc_stage_of_the_others_as_it_was(tmp_path):
    """`dvc repro` re-runs a stage whose command, dependencies, params values or outputs
    changed: adding seed 1 changes none of seed 0's stages but summarize, which lists every
    node (DVC's report depends on the summary and the models folder, not on params)."""
    one = _dvc_stages(project_copy(tmp_path / "one", **SMALL_SWEEP))
    two = _dvc_stages(project_copy(tmp_path / "two", **SMALL_SWEEP, seeds=[0, 1]))
    changed = sorted(name for name in one if two.get(name) != one[name])
    assert changed == ["summarize"]
    added = set(two) - set(one)
    assert len(added) == len(one) - 4  # not download, prepare, summarize, report
    assert all("/seed1/" in two[name]["cmd"] for name in added)
