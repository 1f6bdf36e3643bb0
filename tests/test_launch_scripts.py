"""The launch scripts: shellcheck-clean, and --dry-run prints the commands they would run."""

import glob
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from grain_jax.hardware import CHIPS, MACHINES

pytestmark = pytest.mark.integration

# launch/gke_xpk.sh run with the least it takes (cluster, zone, bucket, base image).
GKE_RUN = ["run", "--cluster", "c", "--zone", "z", "--bucket", "b", "--base-image", "i"]
SCRIPTS = sorted(glob.glob("launch/*.sh") + glob.glob("launch/*.sbatch") + glob.glob("tests/fakes/*"))


def dry_run(script: str, *args: str) -> list[list[str]]:
  """The commands `script ARGS --dry-run [-- MAIN_ARGS]` prints (stdout and stderr), each split into words."""
  args = list(args)
  end = args.index("--") if "--" in args else len(args)
  result = subprocess.run(
    ["bash", script, *args[:end], "--dry-run", *args[end:]], capture_output=True, text=True, timeout=60
  )
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in (result.stdout + result.stderr).splitlines()]


def find(commands: list[list[str]], *prefix: str) -> list[list[str]]:
  return [command for command in commands if command[: len(prefix)] == list(prefix)]


def option(command: list[str], name: str) -> str:
  return command[command.index(name) + 1]


@pytest.mark.skipif(
  shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_scripts_pass_shellcheck():
  result = subprocess.run(["shellcheck", "--external-sources", *SCRIPTS], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_tpu_pod_up_creates_copies_installs_and_runs_on_every_worker():
  commands = dry_run(
    "launch/tpu_pod.sh",
    "up",
    "--name",
    "grain",
    "--zone",
    "us-east5-a",
    "--spot",
    "--bucket",
    "gs://my-bucket",
    "--",
    "--config.train.num_steps=10",
  )
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
  assert shlex.split(main) == [
    ".venv/bin/python",
    "-m",
    "grain_jax.main",
    "--config",
    "configs/cc12m_b16.py:grain,tpu_v5p_128",
    "--workdir",
    "/gcs/my-bucket/runs/grain",
    "--config.train.num_steps=10",
  ]


@pytest.mark.parametrize("preset", [name for name, machine in MACHINES.items() if machine.accelerator])
def test_tpu_pod_defaults_are_the_hardware_tables(preset):
  accelerator = MACHINES[preset].accelerator
  location = ["--name", "n", "--zone", "z", "--accelerator", accelerator]
  [create] = find(dry_run("launch/tpu_pod.sh", "create", *location), "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert option(create, "--version") == CHIPS[MACHINES[preset].chip].runtime_version
  start = find(dry_run("launch/tpu_pod.sh", "run", *location, "--workdir", "/gcs/b/r"), "gcloud", "compute", "tpus")
  assert f"--config configs/cc12m_b16.py:grain,{preset} " in option(start[-1], "--command")


def test_the_launch_scripts_read_the_hardware_table_and_hold_no_copy(tmp_path):
  """The scripts beside a copy of grain_jax/hardware.py whose v5p facts are changed print the changed
  values; no launch file names a runtime version or a TPU mesh preset itself."""
  shutil.copytree("launch", tmp_path / "launch")
  (tmp_path / "grain_jax").mkdir()
  shutil.copy("grain_jax/__init__.py", tmp_path / "grain_jax")
  table = Path("grain_jax/hardware.py").read_text()
  changes = (
    'CHIPS["TPU v5p"] = dataclasses.replace(CHIPS["TPU v5p"], runtime_version="runtime-of-the-table")\n'
    'MACHINES["preset_of_the_table"] = MACHINES.pop("tpu_v5p_128")\n\n'
  )
  entry = 'if __name__ == "__main__":'
  assert table.count(entry) == 1
  (tmp_path / "grain_jax" / "hardware.py").write_text(table.replace(entry, changes + entry))
  facts = [chip.runtime_version for chip in CHIPS.values() if chip.runtime_version]
  facts += [name for name, machine in MACHINES.items() if machine.accelerator]
  for path in Path("launch").iterdir():
    assert not [fact for fact in facts if fact in path.read_text()], path
  tpu_pod, gke_xpk = str(tmp_path / "launch" / "tpu_pod.sh"), str(tmp_path / "launch" / "gke_xpk.sh")
  location = ["--name", "n", "--zone", "z", "--accelerator", "v5p-128"]
  [create] = find(dry_run(tpu_pod, "create", *location), "gcloud", "compute", "tpus", "tpu-vm", "create")
  assert option(create, "--version") == "runtime-of-the-table"
  start = find(dry_run(tpu_pod, "run", *location, "--workdir", "/gcs/b/r"), "gcloud", "compute", "tpus")[-1]
  assert "--config configs/cc12m_b16.py:grain,preset_of_the_table " in option(start, "--command")
  [submit] = find(dry_run(gke_xpk, *GKE_RUN), "xpk")
  main = shlex.split(option(submit, "--command"))
  assert option(main, "--config") == "configs/cc12m_b16.py:grain,preset_of_the_table"


def test_a_launch_without_python_says_what_to_set(tmp_path):
  result = subprocess.run(
    ["bash", "launch/tpu_pod.sh", "create", "--name", "n", "--zone", "z", "--dry-run"],
    env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "missing")},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1 and "set PYTHON to a python3" in result.stderr
  assert "gcloud compute tpus tpu-vm create" not in result.stdout + result.stderr


def test_tpu_pod_queued_resources_and_git_install():
  commands = dry_run(
    "launch/tpu_pod.sh",
    "up",
    "--name",
    "q",
    "--zone",
    "z",
    "--queued",
    "--spot",
    "--accelerator",
    "v5litepod-64",
    "--repo",
    "https://example.com/grain-jax.git",
    "--git-ref",
    "v1",
    "--workdir",
    "/gcs/b/run",
  )
  [create] = find(commands, "gcloud", "compute", "tpus", "queued-resources", "create", "q")
  assert option(create, "--node-id") == "q" and option(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert "--spot" in create
  assert not find(commands, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  setup = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "q")[1]
  assert "git clone --quiet https://example.com/grain-jax.git grain-jax" in option(setup, "--command")
  assert "checkout --quiet v1" in option(setup, "--command")
  start = find(commands, "gcloud", "compute", "tpus", "tpu-vm", "ssh", "q")[-1]
  assert "configs/cc12m_b16.py:grain,tpu_v5e_64" in option(start, "--command")


@pytest.mark.parametrize(
  "queued, expected",
  [
    (False, ["tpu-vm", "delete", "p", "--zone", "z", "--quiet"]),
    (True, ["queued-resources", "delete", "p", "--zone", "z", "--force", "--quiet"]),
  ],
)
def test_tpu_pod_delete(queued, expected):
  commands = dry_run("launch/tpu_pod.sh", "delete", "--name", "p", "--zone", "z", *(["--queued"] if queued else []))
  assert commands == [["gcloud", "compute", "tpus", *expected]]


def test_tpu_pod_logs_follow_one_worker():
  [logs] = dry_run("launch/tpu_pod.sh", "logs", "--name", "p", "--zone", "z", "--worker", "3")
  assert "--worker=3" in logs and option(logs, "--command").startswith("tail")


def test_tpu_pod_rejects_bad_input():
  result = subprocess.run(
    ["bash", "launch/tpu_pod.sh", "up", "--zone", "z", "--dry-run"], capture_output=True, text=True
  )
  assert result.returncode == 2 and "--name is required" in result.stderr


@pytest.mark.parametrize("process_per, tasks, cpus", [("gpu", "8", "12"), ("node", "1", "96")])
def test_slurm_submits_the_sbatch_script(process_per, tasks, cpus):
  [submit] = dry_run(
    "launch/slurm_gpu.sh",
    "--nodes",
    "2",
    "--process-per",
    process_per,
    "--partition",
    "h100",
    "--",
    "--config",
    "configs/cc12m_b16.py:grain,gpu_2x8_h100",
    "--workdir",
    "/shared/run",
  )
  assert submit == [
    "sbatch",
    "--nodes=2",
    f"--ntasks-per-node={tasks}",
    "--gpus-per-node=8",
    f"--cpus-per-task={cpus}",
    "--partition=h100",
    "launch/slurm_gpu.sbatch",
    "--config",
    "configs/cc12m_b16.py:grain,gpu_2x8_h100",
    "--workdir",
    "/shared/run",
  ]


def test_local_launcher_gives_each_process_its_id():
  commands = dry_run(
    "launch/local_multiprocess.sh",
    "--processes",
    "3",
    "--port",
    "1234",
    "--",
    "--config",
    "configs/base.py:tiny",
    "--workdir",
    "runs/x",
  )
  assert len(commands) == 3
  for index, command in enumerate(commands):
    assert command[:3] == ["env", "JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=1"]
    assert command[-4:] == [
      "--config.train.multiprocess=True",
      "--config.train.coordinator_address=127.0.0.1:1234",
      "--config.train.num_processes=3",
      f"--config.train.process_id={index}",
    ]


@pytest.mark.parametrize("program, status", [("true", 0), ("false", 1)])
def test_local_launcher_returns_the_status_of_a_failing_process(program, status):
  result = subprocess.run(
    ["bash", "launch/local_multiprocess.sh", "--processes", "3", "--port", "1234", "--", "--workdir", "x"],
    env={"PATH": "/usr/bin:/bin", "PYTHON": program},
    capture_output=True,
    text=True,
    timeout=60,
  )
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
  [submit] = dry_run(
    "launch/gke_xpk.sh", "run", *location, "--base-image", "gcr.io/p/deps:1", "--", "--config.train.num_steps=10"
  )
  assert submit[:3] == ["xpk", "workload", "create"] and option(submit, "--workload") == "grain"
  assert option(submit, "--max-restarts") == "10" and option(submit, "--base-docker-image") == "gcr.io/p/deps:1"
  # The image holds the dependencies: the pod installs nothing, and exec lets the SIGTERM that ends a pod
  # reach Python, not a shell.
  assert shlex.split(option(submit, "--command")) == [
    "exec",
    "python",
    "-m",
    "grain_jax.main",
    "--config",
    "configs/cc12m_b16.py:grain,tpu_v5p_128",
    "--workdir",
    "/gcs/My_Data.b/runs/grain",
    "--config.train.num_steps=10",
  ]


def xpk_restart_codes(flag: str) -> set[int]:
  """The exit statuses on which xpk's JobSet restarts, given --restart-on-exit-codes FLAG: xpk's own
  parsing (xpk/commands/workload.py, get_restart_exit_codes), defaults 42 and 127-255 included."""
  codes = {42, *range(127, 256)}
  for item in flag.split(","):
    start, _, end = item.strip().partition("-")
    codes.update(range(int(start), int(end or start) + 1))
  return codes


def test_gke_xpk_restarts_a_preempted_or_crashed_pod_and_gives_it_time_to_save():
  """xpk restarts only on 42 and 127-255 unless told more: the trainer's 75 (saved on SIGTERM) and a
  crash's 1 would end the job for good. A user error (2) fails the same way on every try."""
  [submit] = dry_run("launch/gke_xpk.sh", *GKE_RUN)
  codes = xpk_restart_codes(option(submit, "--restart-on-exit-codes"))
  assert {1, 75, 137, 143} <= codes and 2 not in codes and 0 not in codes
  assert option(submit, "--termination-grace-period-seconds") == "300"  # xpk's default is 30
  [submit] = dry_run(
    "launch/gke_xpk.sh",
    *GKE_RUN,
    "--grace-seconds",
    "600",
  )
  assert option(submit, "--termination-grace-period-seconds") == "600"


def test_the_gke_image_holds_the_pinned_requirements():
  """launch/Dockerfile installs the same files, and the same jax pin, as launch/install.sh tpu."""
  dockerfile = Path("launch/Dockerfile").read_text()
  assert "COPY requirements.txt requirements-tpu.txt /tmp/requirements/" in dockerfile
  assert "-r /tmp/requirements/requirements.txt -r /tmp/requirements/requirements-tpu.txt" in dockerfile
  assert "jax[tpu]==$(sed -n 's/^jax==//p' /tmp/requirements/requirements.txt)" in dockerfile
  assert "jax[$extra]==$(sed -n 's/^jax==//p' requirements.txt)" in Path("launch/install.sh").read_text()


@pytest.mark.parametrize("command", ["status", "delete", "delete-cluster"])
def test_gke_xpk_manages_the_workload(command):
  expected = {
    "status": ["workload", "list"],
    "delete": ["workload", "delete"],
    "delete-cluster": ["cluster", "delete"],
  }[command]
  [xpk] = dry_run("launch/gke_xpk.sh", command, "--cluster", "c", "--zone", "z", "--name", "w")
  assert xpk[:3] == ["xpk", *expected] and option(xpk, "--cluster") == "c"
  assert command == "delete-cluster" or "w" in xpk


def test_gke_xpk_rejects_bad_input():
  result = subprocess.run(
    ["bash", "launch/gke_xpk.sh", "run", "--zone", "z", "--dry-run"], capture_output=True, text=True
  )
  assert result.returncode == 2 and "--cluster is required" in result.stderr
  result = subprocess.run(
    ["bash", "launch/gke_xpk.sh", "run", "--cluster", "c", "--zone", "z", "--bucket", "b", "--dry-run"],
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and "run needs --base-image" in result.stderr


def test_gke_xpk_passes_a_bucket_url_workdir_to_the_trainer():
  [submit] = dry_run(
    "launch/gke_xpk.sh", "run", "--cluster", "c", "--zone", "z", "--workdir", "gs://b/r", "--base-image", "i"
  )
  assert shlex.split(option(submit, "--command"))[-2:] == ["--workdir", "gs://b/r"]


def test_gke_xpk_refuses_an_image_of_a_large_checkout(tmp_path):
  """What .dockerignore leaves out does not count; anything else above --max-archive-mb stops the run."""
  root = tmp_path / "checkout"
  (root / "shards").mkdir(parents=True)
  subprocess.run(["git", "init", "-q"], cwd=root, check=True)
  for folder in ("launch", "grain_jax"):
    (root / folder).symlink_to(Path(folder).resolve())
  shutil.copy(".dockerignore", root)
  (root / "shards" / "big.array_record").write_bytes(b"x" * 2_000_000)
  command = [
    "bash",
    str(root / "launch" / "gke_xpk.sh"),
    *GKE_RUN,
    "--max-archive-mb",
    "1",
    "--dry-run",
  ]
  result = subprocess.run(command, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.startswith("xpk workload create"), result.stderr
  (root / "photos").mkdir()
  (root / "photos" / "big.tar").write_bytes(b"x" * 2_000_000)
  result = subprocess.run(command, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and not result.stdout
  assert "more than --max-archive-mb 1 MB" in result.stderr and "photos/big.tar" in result.stderr
  assert ".dockerignore" in result.stderr


# Each launcher with arguments that would run for real, and the tool it would run.
LAUNCHERS = [
  ("launch/gke_xpk.sh", GKE_RUN, "xpk"),
  ("launch/tpu_pod.sh", ["delete", "--name", "p", "--zone", "z"], "gcloud"),
  ("launch/slurm_gpu.sh", [], "sbatch"),
  ("launch/local_multiprocess.sh", ["--port", "1234"], "python"),
]


@pytest.mark.parametrize("script, args, tool", LAUNCHERS)
def test_a_dry_run_after_the_separator_is_refused(tmp_path, script, args, tool):
  """After `--` the flag would reach grain_jax.main, and the launcher would run everything for real."""
  ran = tmp_path / "ran"
  (tmp_path / tool).write_text(f'#!/bin/sh\ntouch "{ran}"\n')
  (tmp_path / tool).chmod(0o755)
  result = subprocess.run(
    ["bash", script, *args, "--", "--workdir", "/w", "--dry-run"],
    env={"PATH": f"{tmp_path}:/usr/bin:/bin", "PYTHON": str(tmp_path / "python")},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 2, result.stderr
  assert "--dry-run after -- would go to grain_jax.main" in result.stderr
  assert not ran.exists()


def test_an_old_bash_is_refused_with_a_clear_message():
  result = subprocess.run(
    ["bash", "-c", "source launch/lib.sh && require_bash 99 0 && echo went-on"], capture_output=True, text=True
  )
  assert result.returncode == 2 and not result.stdout
  assert "needs bash 99.0 or newer, and this is bash " in result.stderr and "brew install bash" in result.stderr


OLD_BASH = os.environ.get("GRAIN_JAX_OLD_BASH", "")


@pytest.mark.skipif(
  not OLD_BASH,
  reason="set GRAIN_JAX_OLD_BASH to a bash 3.2 (macOS's /bin/bash, or one built "
  "from bash-3.2's source) to run the launch scripts under it",
)
@pytest.mark.parametrize(
  "script, args, needed",
  [
    ("launch/gke_xpk.sh", GKE_RUN, "4.4"),
    ("launch/tpu_pod.sh", ["up", "--name", "p", "--zone", "z", "--bucket", "b"], "4.4"),
    ("launch/slurm_gpu.sh", ["--", "--workdir", "/w"], "4.4"),
    ("launch/local_multiprocess.sh", ["--", "--workdir", "/w"], "5.1"),
  ],
)
def test_the_laptop_scripts_stop_on_macos_bash(script, args, needed):
  """macOS's bash 3.2 lacks `${x@Q}`, `${x,,}` and empty arrays under `set -u`: without the check the
  scripts died halfway with "unbound variable"."""
  result = subprocess.run([OLD_BASH, script, *args, "--dry-run"], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and not result.stdout, result.stdout + result.stderr
  assert result.stderr.startswith(f"{script} needs bash {needed} or newer, and this is bash 3.2"), result.stderr


def run_mount_bucket(
  tmp_path: Path, path: str = f"{Path('tests/fakes').resolve()}:/usr/bin:/bin", **env: str
) -> subprocess.CompletedProcess:
  """`launch/mount_bucket.sh gs://my-bucket` with the fakes (gcsfuse, sudo, mountpoint) on PATH."""
  env = {
    "PATH": path,
    "FAKE_GCSFUSE_LOG": str(tmp_path / "gcsfuse.log"),
    "FAKE_SUDO_LOG": str(tmp_path / "sudo.log"),
    **env,
  }
  return subprocess.run(
    ["bash", "launch/mount_bucket.sh", "gs://my-bucket"], env=env, capture_output=True, text=True, timeout=60
  )


def mount_bucket(tmp_path: Path) -> list[str]:
  """The gcsfuse command `launch/mount_bucket.sh gs://my-bucket` runs (a fake gcsfuse logs it), split into words."""
  result = run_mount_bucket(tmp_path)
  assert result.returncode == 0, result.stderr
  [mount] = [shlex.split(line) for line in (tmp_path / "gcsfuse.log").read_text().splitlines()]
  return mount


def test_the_bucket_is_mounted_so_that_checkpoints_commit_and_hosts_agree(tmp_path):
  """Orbax commits a checkpoint by renaming a folder, which gcsfuse refuses by default on a flat bucket;
  a metadata cache would let a host list a shared folder as it was earlier; with streaming writes (on by
  default since gcsfuse 3.0) fsync no longer uploads a new file, so the TensorBoard events, open the whole
  run, would reach the bucket only at its end."""
  mount = mount_bucket(tmp_path)
  assert mount[-2:] == ["my-bucket", "/gcs/my-bucket"]
  assert {
    "--implicit-dirs",
    "--metadata-cache-ttl-secs=0",
    "--metadata-cache-negative-ttl-secs=0",
    "--enable-streaming-writes=false",
  } <= set(mount)
  [limit] = [flag for flag in mount if flag.startswith("--rename-dir-limit=")]
  assert int(limit.split("=")[1]) >= 10_000  # a checkpoint's files, with room


@pytest.mark.parametrize("version, mounted", [("2.7.1", False), ("2.8.0", True), ("3.11.2", True), ("10.0.0", True)])
def test_a_gcsfuse_older_than_the_options_is_refused(tmp_path, version, mounted):
  """metadata-cache-negative-ttl-secs and enable-streaming-writes came with gcsfuse 2.8.0; an older one
  refuses them and the bucket does not mount."""
  result = run_mount_bucket(tmp_path, FAKE_GCSFUSE_VERSION=version)
  assert (result.returncode == 0) == mounted, result.stderr
  assert (tmp_path / "gcsfuse.log").exists() == mounted
  if not mounted:
    assert "gcsfuse 2.8.0 or newer is needed" in result.stderr and f"version {version}" in result.stderr


def test_installing_gcsfuse_waits_for_the_dpkg_lock(tmp_path):
  """unattended-upgrades holds the dpkg lock on a freshly booted worker: apt-get must wait for it."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("mountpoint", "curl"):
    (bin_dir / tool).write_text("#!/bin/sh\n")
    (bin_dir / tool).chmod(0o755)
  (bin_dir / "lsb_release").write_text("#!/bin/sh\necho jammy\n")
  # The fake sudo logs each command; `apt-get install` "installs" the fake gcsfuse.
  (bin_dir / "sudo").write_text(
    f'#!/bin/sh\necho "$*" >>"{tmp_path}/sudo.log"\n'
    f'case "$*" in *" install "*) ln -s {Path("tests/fakes/gcsfuse").resolve()} '
    f"{bin_dir}/gcsfuse ;; esac\ncat >/dev/null\n"
  )
  (bin_dir / "sudo").chmod(0o755)
  result = run_mount_bucket(tmp_path, path=f"{bin_dir}:/usr/bin:/bin")
  assert result.returncode == 0, result.stderr
  apt = [shlex.split(line) for line in (tmp_path / "sudo.log").read_text().splitlines() if line.startswith("apt-get")]
  assert [command[3] for command in apt] == ["update", "install"]
  assert all(command[1:3] == ["-o", "DPkg::Lock::Timeout=900"] for command in apt)


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
  result = subprocess.run(
    ["bash", "launch/local_multiprocess.sh", "--processes", "2", "--port", "1234", "--", "--workdir", "x"],
    env={"PATH": "/usr/bin:/bin", "PYTHON": str(program)},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 75 and "failed" not in result.stderr, result.stderr
  assert (tmp_path / "python.saved").exists()
