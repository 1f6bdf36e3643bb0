"""The launch scripts: shellcheck-clean, and --dry-run prints the commands they would run."""

import glob
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted(glob.glob("launch/*.sh") + glob.glob("launch/*.sbatch") + glob.glob("tests/fakes/*"))


def dry_run(script: str, *args: str) -> list[list[str]]:
  """The commands `script ARGS --dry-run [-- MAIN_ARGS]` prints (stdout and stderr), each split into words."""
  args = list(args)
  end = args.index("--") if "--" in args else len(args)
  result = subprocess.run(["bash", script, *args[:end], "--dry-run", *args[end:]], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in (result.stdout + result.stderr).splitlines()]


def find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
  return [command for command in commands if command[:len(prefix)] == list(prefix)]


def option(command: list[str], name: str) -> str:
  return command[command.index(name) + 1]


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
  result = subprocess.run(["shellcheck", "--external-sources", *SCRIPTS], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_pod_up_creates_copies_installs_and_runs_on_every_worker():
  commands = dry_run("launch/tpu_pod.sh", "up", "--name", "grain", "--zone", "us-east5-a", "--spot",
                     "--bucket", "gs://my-bucket", "--", "--config.train.num_steps=10")
  [create] = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "create", "grain")
  assert option(create, "--accelerator-type") == "v5p-128" and option(create, "--version") == "v2-alpha-tpuv5"
  assert "--spot" in create and option(create, "--zone") == "us-east5-a"
  [copy] = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert "--worker=all" in copy
  stop, setup, start = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "grain")
  assert all("--worker=all" in command for command in (setup, stop, start))
  assert "bash launch/install.sh tpu" in option(setup, "--command")
  assert "bash launch/mount_bucket.sh my-bucket" in option(setup, "--command")
  assert "bash grain-jax/launch/tpu_worker.sh stop" in option(stop, "--command")
  worker, main = option(start, "--command").split(" -- ", 1)
  assert shlex.split(worker)[:7] == ["cd", "grain-jax", "&&", "bash", "launch/tpu_worker.sh", "start", "--workdir"]
  assert shlex.split(main) == [".venv/bin/python", "-m", "grain_jax.main", "--config", "configs/cc12m_b16.py:grain,tpu_v5p_128",
                  "--workdir", "/gcs/my-bucket/runs/grain", "--config.train.num_steps=10"]


def test_tpu_pod_queued_resources_and_git_install():
  commands = dry_run("launch/tpu_pod.sh", "up", "--name", "q", "--zone", "z", "--queued", "--spot",
                     "--accelerator", "v5litepod-64", "--repo", "https://example.com/grain-jax.git",
                     "--git-ref", "v1", "--workdir", "/gcs/b/run")
  [create] = find(commands, "gcloud", "compute", "tpus", "queued-resources", "create", "q")
  assert option(create, "--node-id") == "q" and option(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--spot" in create
  assert not find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  setup = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "q")[1]
  assert "git clone --quiet https://example.com/grain-jax.git grain-jax" in option(setup, "--command")
  assert "checkout --quiet v1" in option(setup, "--command")
  start = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "q")[-1]
  assert "configs/cc12m_b16.py:grain,tpu_v5e_64" in option(start, "--command")


@pytest.mark.parametrize("queued, expected", [(False, ["tpu-vm", "delete", "p", "--zone", "z", "--quiet"]),
                                              (True, ["queued-resources", "delete", "p", "--zone", "z", "--force",
                                                      "--quiet"])])
def test_tpu_pod_delete(queued, expected):
  commands = dry_run("launch/tpu_pod.sh", "delete", "--name", "p", "--zone", "z", *(["--queued"] if queued else []))
  assert commands == [["gcloud", "compute", "tpus", *expected]]


def test_tpu_pod_logs_follow_one_worker():
  [logs] = dry_run("launch/tpu_pod.sh", "logs", "--name", "p", "--zone", "z", "--worker", "3")
  assert "--worker=3" in logs and option(logs, "--command").startswith("tail")


def test_tpu_pod_rejects_bad_input():
  result = subprocess.run(["bash", "launch/tpu_pod.sh", "up", "--zone", "z", "--dry-run"], capture_output=True,
                          text=True)
  assert result.returncode == 2 and "--name is required" in result.stderr


@pytest.mark.parametrize("process_per, tasks, cpus", [("gpu", "8", "12"), ("node", "1", "96")])
def test_slurm_submits_the_sbatch_script(process_per, tasks, cpus):
  [submit] = dry_run("launch/slurm_gpu.sh", "--nodes", "2", "--process-per", process_per, "--partition", "h100",
                     "--", "--config", "configs/cc12m_b16.py:grain,gpu_2x8_h100", "--workdir", "/shared/run")
  assert submit == ["sbatch", "--nodes=2", f"--ntasks-per-node={tasks}", "--gpus-per-node=8", f"--cpus-per-task={cpus}",
                    "--partition=h100",
                    "launch/slurm_gpu.sbatch", "--config", "configs/cc12m_b16.py:grain,gpu_2x8_h100",
                    "--workdir", "/shared/run"]


def test_local_launcher_gives_each_process_its_id():
  commands = dry_run("launch/local_multiprocess.sh", "--processes", "3", "--port", "1234", "--",
                     "--config", "configs/base.py:tiny", "--workdir", "runs/x")
  assert len(commands) == 3
  for index, command in enumerate(commands):
    assert command[:3] == ["env", "JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=1"]
    assert command[-4:] == ["--config.train.multiprocess=True", "--config.train.coordinator_address=127.0.0.1:1234",
                            "--config.train.num_processes=3", f"--config.train.process_id={index}"]


@pytest.mark.parametrize("program, status", [("true", 0), ("false", 1)])
def test_local_launcher_returns_the_status_of_a_failing_process(program, status):
  result = subprocess.run(["bash", "launch/local_multiprocess.sh", "--processes", "3", "--port", "1234", "--",
                           "--workdir", "x"], env={"PATH": "/usr/bin:/bin", "PYTHON": program},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == status, result.stderr
  assert ("a process failed (status 1)" in result.stderr) == bool(status)


def test_gke_xpk_creates_the_cluster_and_submits_the_workload():
  location = ["--cluster", "c", "--zone", "z", "--spot", "--bucket", "gs://My_Data.b"]
  create, attach = dry_run("launch/gke_xpk.sh", "cluster", *location)
  assert create[:3] == ["xpk", "cluster", "create"] and option(create, "--tpu-type") == "v5p-128"
  assert "--spot" in create and "--on-demand" not in create and option(create, "--cluster") == "c"
  # The storage is a Kubernetes object: its name is the bucket's, made a valid one.
  assert attach[:4] == ["xpk", "storage", "attach", "my-data-b"] and option(attach, "--type") == "gcsfuse"
  assert option(attach, "--bucket") == "My_Data.b" and option(attach, "--mount-point") == "/gcs/My_Data.b"
  assert option(attach, "--auto-mount") == "true"
  [submit] = dry_run("launch/gke_xpk.sh", "run", *location, "--", "--config.train.num_steps=10")
  assert submit[:3] == ["xpk", "workload", "create"] and option(submit, "--workload") == "grain"
  assert option(submit, "--max-restarts") == "10" and option(submit, "--base-docker-image") == "python:3.11"
  install, main = option(submit, "--command").split(" && ")
  assert install == "bash launch/install.sh tpu"
  # exec: the SIGTERM that ends a pod reaches Python, not a shell.
  assert shlex.split(main) == ["exec", ".venv/bin/python", "-m", "grain_jax.main", "--config",
                               "configs/cc12m_b16.py:grain,tpu_v5p_128", "--workdir", "/gcs/My_Data.b/runs/grain",
                               "--config.train.num_steps=10"]


@pytest.mark.parametrize("command, expected", [("status", ["workload", "list"]), ("delete", ["workload", "delete"]),
                                               ("delete-cluster", ["cluster", "delete"])])
def test_gke_xpk_manages_the_workload(command, expected):
  [xpk] = dry_run("launch/gke_xpk.sh", command, "--cluster", "c", "--zone", "z", "--name", "w")
  assert xpk[:3] == ["xpk", *expected] and option(xpk, "--cluster") == "c"
  assert command == "delete-cluster" or "w" in xpk


def test_gke_xpk_rejects_bad_input():
  result = subprocess.run(["bash", "launch/gke_xpk.sh", "run", "--zone", "z", "--dry-run"], capture_output=True,
                          text=True)
  assert result.returncode == 2 and "--cluster is required" in result.stderr
  result = subprocess.run(["bash", "launch/gke_xpk.sh", "run", "--cluster", "c", "--zone", "z", "--workdir", "gs://b/r",
                           "--dry-run"], capture_output=True, text=True)
  assert result.returncode == 2 and "--workdir gs://b/r: a URL" in result.stderr


def test_gke_xpk_refuses_an_image_of_a_large_checkout(tmp_path):
  """What .dockerignore leaves out does not count; anything else above --max-archive-mb stops the run."""
  root = tmp_path / "checkout"
  (root / "shards").mkdir(parents=True)
  subprocess.run(["git", "init", "-q"], cwd=root, check=True)
  (root / "launch").symlink_to(Path("launch").resolve())
  shutil.copy(".dockerignore", root)
  (root / "shards" / "big.array_record").write_bytes(b"x" * 2_000_000)
  command = ["bash", str(root / "launch" / "gke_xpk.sh"), "run", "--cluster", "c", "--zone", "z", "--bucket", "b",
             "--max-archive-mb", "1", "--dry-run"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.startswith("xpk workload create"), result.stderr
  (root / "photos").mkdir()
  (root / "photos" / "big.tar").write_bytes(b"x" * 2_000_000)
  result = subprocess.run(command, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and not result.stdout
  assert "more than --max-archive-mb 1 MB" in result.stderr and "photos/big.tar" in result.stderr
  assert ".dockerignore" in result.stderr


def mount_bucket(tmp_path: Path) -> list[str]:
  """The gcsfuse command `launch/mount_bucket.sh gs://my-bucket` runs (a fake gcsfuse logs it), split into words."""
  env = {"PATH": f"{Path('tests/fakes').resolve()}:/usr/bin:/bin", "FAKE_GCSFUSE_LOG": str(tmp_path / "gcsfuse.log"),
         "FAKE_SUDO_LOG": str(tmp_path / "sudo.log")}
  result = subprocess.run(["bash", "launch/mount_bucket.sh", "gs://my-bucket"], env=env, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  [mount] = [shlex.split(line) for line in (tmp_path / "gcsfuse.log").read_text().splitlines()]
  return mount


def test_the_bucket_is_mounted_so_that_checkpoints_commit_and_hosts_agree(tmp_path):
  """Orbax commits a checkpoint by renaming a folder, which gcsfuse refuses by default on a flat bucket;
  a metadata cache would let a host list a shared folder as it was earlier."""
  mount = mount_bucket(tmp_path)
  assert mount[-2:] == ["my-bucket", "/gcs/my-bucket"]
  assert {"--implicit-dirs", "--metadata-cache-ttl-secs=0", "--metadata-cache-negative-ttl-secs=0"} <= set(mount)
  [limit] = [flag for flag in mount if flag.startswith("--rename-dir-limit=")]
  assert int(limit.split("=")[1]) >= 10_000  # a checkpoint's files, with room


def test_gke_pods_mount_the_bucket_with_the_tpu_vm_options(tmp_path):
  """GKE's Cloud Storage FUSE CSI driver runs gcsfuse with --NAME[=VALUE] for each mount option NAME[=VALUE];
  xpk's --mount-options replaces its default (implicit-dirs), so the list must hold every option."""
  [_, attach] = dry_run("launch/gke_xpk.sh", "cluster", "--cluster", "c", "--zone", "z", "--bucket", "my-bucket")
  gke_flags = ["--" + entry for entry in option(attach, "--mount-options").split(",")]
  assert gke_flags == mount_bucket(tmp_path)[:-2] and "--implicit-dirs" in gke_flags
  assert "--no-prefetch-metadata" in attach  # a prefetch would fill the metadata cache the options turn off


def test_local_launcher_lets_every_process_finish_its_save_after_a_notice(tmp_path):
  """Status 75 (saved on a preemption notice) is no failure: the other processes, saving the same step,
  are waited for, not stopped, and the launcher returns 75."""
  program = tmp_path / "python"
  program.write_text('#!/usr/bin/env bash\n[[ "${!#}" == *=0 ]] || { sleep 1; touch "$0.saved"; }\nexit 75\n')
  program.chmod(0o755)
  result = subprocess.run(["bash", "launch/local_multiprocess.sh", "--processes", "2", "--port", "1234", "--",
                           "--workdir", "x"], env={"PATH": "/usr/bin:/bin", "PYTHON": str(program)},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 75 and "failed" not in result.stderr, result.stderr
  assert (tmp_path / "python.saved").exists()
