"""The launchers offline: every script parses, each runs the same `neox-jax train` line, the JobSet
manifest has JobSet's required fields and a coordinator address that matches its pod names, and
the SLURM and TPU scripts, run against stand-ins for srun/scontrol and gcloud, hand every process
the coordinator, process count and rank (and pass extra options through)."""

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
LINE = '$NEOX_JAX train "$CONFIG" --run-dir "$RUN_DIR"'
SCRIPTS = ["local.sh", "slurm.sbatch", "tpu_pod.sh", "xla_gpu_flags.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_parse(name):
    r = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["local.sh", "slurm.sbatch", "tpu_pod.sh", "k8s-jobset.yaml"])
def test_every_launcher_runs_the_same_train_line(name):
    text = (LAUNCH / name).read_text()
    assert text.count(LINE) == 1, name
    assert "Knobs" in text  # the comment block listing them


def test_jobset_manifest():
    doc = yaml.safe_load((LAUNCH / "k8s-jobset.yaml").read_text())
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    name, spec = doc["metadata"]["name"], doc["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    (rj,) = spec["replicatedJobs"]
    job = rj["template"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
    (c,) = job["template"]["spec"]["containers"]
    assert c["name"] and c["image"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["NEOX_JAX_NUM_PROCESSES"]) == job["completions"]
    # JobSet names pods <jobset>-<replicatedJob>-<jobIndex>-<podIndex> under the subdomain
    host, port = env["NEOX_JAX_COORDINATOR"].rsplit(":", 1)
    assert host == f"{name}-{rj['name']}-0-0.{spec['network']['subdomain']}"
    assert {"containerPort": int(port)} in c["ports"]
    script = c["args"][0]
    assert "NEOX_JAX_PROCESS_ID=$JOB_COMPLETION_INDEX" in script and "source launch/xla_gpu_flags.sh" in script


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _fake_neox(tmp_path: Path) -> Path:
    """Stands in for neox-jax: records its environment's NEOX_JAX_* variables and arguments."""
    _exe(tmp_path / "bin" / "fake-neox",
         '#!/usr/bin/env bash\necho "$NEOX_JAX_PROCESS_ID|$NEOX_JAX_NUM_PROCESSES|$NEOX_JAX_COORDINATOR|'
         '${NEOX_JAX_DISTRIBUTED:-}|$*" >> "$OUT"\n')
    return tmp_path / "bin" / "fake-neox"


def test_slurm_script_with_fake_srun(tmp_path):
    (tmp_path / "bin").mkdir()
    fake = _fake_neox(tmp_path)
    _exe(tmp_path / "bin" / "scontrol", '#!/usr/bin/env bash\nprintf "gpu-a07\\ngpu-a08\\n"\n')
    # srun: run the step once per task with SLURM_PROCID / SLURM_LOCALID, as srun does
    _exe(tmp_path / "bin" / "srun", '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n'
         'for i in $(seq 0 $((SLURM_NTASKS - 1))); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX"))}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", OUT=str(tmp_path / "out"), NEOX_JAX=str(fake),
               CONFIG="cfg.yaml", SLURM_JOB_ID="123", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2",
               SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_SUBMIT_DIR=str(ROOT), PLATFORM="cpu")
    r = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--set", "train.steps=5"], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines == [f"{i}|2|gpu-a07:40123||train cfg.yaml --run-dir runs/slurm-123 --set train.steps=5"
                     for i in range(2)]


@pytest.mark.parametrize("extra, repo", [(["--set", "train.steps=5"], None), ([], "~/my repo"),
                                         (["--set", "train.name=a b"], "~"), ([], "plain")])
def test_tpu_script_with_fake_gcloud(tmp_path, extra, repo):
    """gcloud's --command, run here by bash, is what each TPU host runs.  With no extra options the
    host's command line has none (it had one empty argument, which `train` refused); a REPO_DIR with
    a space, under the host's home (~), is one directory there."""
    (tmp_path / "bin").mkdir()
    fake = _fake_neox(tmp_path)
    _exe(tmp_path / "bin" / "gcloud", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$OUT.args"\n'
         'for a in "$@"; do case $a in --command=*) cmd=${a#--command=};; esac; done\n'
         'prev=""; for a in "$@"; do [[ $prev == --command ]] && cmd=$a; prev=$a; done\nbash -c "$cmd"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX"))}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", OUT=str(tmp_path / "out"), NEOX_JAX=str(fake),
               TPU_NAME="v5p-256", ZONE="us-east5-a", CONFIG="configs/x y.yaml", RUN_DIR="/mnt/runs/a",
               REPO_DIR=str(tmp_path / "repo") if repo is None else repo, HOME=str(tmp_path / "home"))
    host_repo = {None: tmp_path / "repo", "~/my repo": tmp_path / "home" / "my repo", "~": tmp_path / "home",
                 "plain": tmp_path / "plain"}[repo]  # (relative: the host's login directory)
    host_repo.mkdir(parents=True, exist_ok=True)
    (host_repo / "here").write_text("")
    # the fake neox-jax also records its working directory (REPO_DIR on the host) and its argument count
    _exe(fake, '#!/usr/bin/env bash\necho "$NEOX_JAX_PROCESS_ID|$NEOX_JAX_NUM_PROCESSES|$NEOX_JAX_COORDINATOR|'
         '${NEOX_JAX_DISTRIBUTED:-}|$*|$#|$(ls)" >> "$OUT"\n')
    r = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *extra], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "out.args").read_text().splitlines()
    assert args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "v5p-256", "--zone"] and "--worker=all" in args
    assert (tmp_path / "out").read_text() == \
        f"|||auto|{' '.join(['train', 'configs/x y.yaml', '--run-dir', '/mnt/runs/a', *extra])}|{4 + len(extra)}|here\n"


@pytest.mark.parametrize("knob, value", [("NPROC", "0"), ("NPROC", "-1"), ("NPROC", "2x"), ("NPROC", "abc"),
                                         ("DEVICES_PER_PROCESS", "abc"), ("PORT", "99999"), ("PLATFORM", "tpu"),
                                         ("STOP_GRACE_S", "1x")])
def test_local_launcher_refuses_a_bad_knob_in_one_line(tmp_path, knob, value):
    """NPROC=0 or -1 launched nothing and exited 0; 2x printed bash's arithmetic error and exited 0;
    abc was 'unbound variable'; DEVICES_PER_PROCESS=abc had XLA print its whole flag table.  Each is one
    line naming the knob, exit 2, before any process starts (the fake command would record one)."""
    (tmp_path / "bin").mkdir()
    fake = _fake_neox(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX"))}
    env.update(OUT=str(tmp_path / "out"), NEOX_JAX=str(fake), PLATFORM="cpu")
    env[knob] = value
    r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "cfg.yaml", str(tmp_path / "run")], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"launch/local.sh: {knob} must")
    assert not (tmp_path / "out").exists()


def test_local_launcher_with_a_fake_command(tmp_path):
    """Two processes of the fake command, each with its process id, the count and the coordinator."""
    (tmp_path / "bin").mkdir()
    fake = _fake_neox(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX"))}
    env.update(OUT=str(tmp_path / "out"), NEOX_JAX=str(fake), PLATFORM="cpu", NPROC="2", PORT="23456")
    r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "cfg.yaml", str(tmp_path / "run"), "--set", "a=b c"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted((tmp_path / "out").read_text().splitlines()) == [
        f"{i}|2|127.0.0.1:23456||train cfg.yaml --run-dir {tmp_path / 'run'} --set a=b c" for i in range(2)]


def test_local_launcher_waits_for_the_others_after_a_signal_stop(tmp_path):
    """A process that stopped on SIGTERM exits 143 once the run's checkpoint has committed; the others
    stop after the same step and may still be finishing theirs: the launcher waits for them (it used
    to signal them at once) and exits 143.  Process 0 of the fake command takes 1.5 s to stop."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "fake-neox"
    _exe(fake, '#!/usr/bin/env bash\nif [ "$NEOX_JAX_PROCESS_ID" = 0 ]; then sleep 1.5; echo finished >> "$OUT"; fi\n'
               'exit 143\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEOX_JAX"))}
    env.update(OUT=str(tmp_path / "out"), NEOX_JAX=str(fake), PLATFORM="cpu", NPROC="2", PORT="23457")
    r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "cfg.yaml", str(tmp_path / "run")], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 143, r.stderr
    assert (tmp_path / "out").read_text() == "finished\n"
