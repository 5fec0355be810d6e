"""GPU slots on one machine: each training job takes a slot of one GPU before CUDA starts.

Snakemake's local executor counts resources but does not say which GPU a job should use, so
without this every job would train on the first GPU. ``hold_gpu_slots``, called by a stage that
trains before it imports its backend, picks the least-loaded GPU that has a free slot, keeps a
lock on that slot for the life of the process, and sets ``CUDA_VISIBLE_DEVICES`` to that GPU
alone. ``SHRINKFLOW_JOBS_PER_GPU`` jobs may share one GPU (small jobs leave most of it idle);
then TensorFlow is told to grow its GPU memory instead of taking it all at start.

A slot is a file ``<device>.<k>`` in ``slot_dir()``, locked with ``flock``: the kernel drops
the lock when the process ends however it ends (kill -9 included), so a crashed job never
leaves a slot taken. A ``claim.lock`` beside them makes counting and taking atomic, so two jobs
starting together never pick the same GPU when another is emptier. With ``gpu_slots`` set to
GPUs x jobs per GPU (workflow/profiles/gpu), Snakemake never starts more jobs than there are
slots and the least-loaded choice never puts more than ``SHRINKFLOW_JOBS_PER_GPU`` on a GPU;
a job that finds every slot taken anyway (started by hand, or by `dvc repro` beside a run)
waits, and says so.

Nothing is done (the job sees what it saw before) when: the job does not train on a GPU
(``gpus`` 0); ``SHRINKFLOW_JOBS_PER_GPU`` is 0; a parent shrinkflow process already holds
the slot (``SHRINKFLOW_GPU_SLOT`` set: a distributed worker); the job runs under Slurm
(``SLURM_JOB_ID``: Slurm chose its GPUs, shards or MPS share) and ``SHRINKFLOW_JOBS_PER_GPU``
is not set explicitly; or no GPU is found (``CUDA_VISIBLE_DEVICES`` empty or ``-1``, or no
``nvidia-smi``). GPUs are listed without importing a framework: ``CUDA_VISIBLE_DEVICES`` if
set, else ``nvidia-smi -L`` (UUIDs, so that every process names a GPU the same way whatever
CUDA's enumeration order).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say

JOBS_PER_GPU_ENV = "SHRINKFLOW_JOBS_PER_GPU"
SLOT_ENV = "SHRINKFLOW_GPU_SLOT"  # set once held: the slot names; children inherit it
DIR_ENV = "SHRINKFLOW_GPU_SLOT_DIR"  # where the slot files live (tests, site overrides)
DEFAULT_JOBS_PER_GPU = 1  # a whole GPU per job unless the user asks to share
NVIDIA_SMI_TIMEOUT_S = 30  # answers in well under a second; longer means a hung driver
POLL_S = 1.0  # how often a waiting job looks again
# TensorFlow takes almost all of a GPU's memory when it starts, leaving none to a second job;
# with this it takes what it needs, as torch's caching allocator does.
TF_GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"
_UUID = re.compile(r"\(UUID: ((?:GPU|MIG)-[^)\s]+)\)")


@dataclass(frozen=True)
class Slot:
    """One held slot: ``device`` as CUDA_VISIBLE_DEVICES names it, ``index`` among its slots."""

    device: str
    index: int
    fd: int

    @property
    def name(self) -> str:
        return f"{self.device}.{self.index}"


_held: list[Slot] = []  # this process's slots, kept (and locked) until it exits


def jobs_per_gpu() -> int:
    """``SHRINKFLOW_JOBS_PER_GPU`` (default 1); 0 turns the slots off."""
    raw = os.environ.get(JOBS_PER_GPU_ENV, str(DEFAULT_JOBS_PER_GPU)).strip()
    if not raw.isdigit():
        raise ShrinkflowError(f"{JOBS_PER_GPU_ENV}: {raw!r} is not a whole number >= 0")
    return int(raw)


def visible_devices() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries if it is set (CUDA
    stops at the first invalid one, and ``-1`` hides all), else ``nvidia-smi -L``'s UUIDs."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return nvidia_smi_devices()
    devices = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def nvidia_smi_devices() -> list[str]:
    """UUIDs of the GPUs ``nvidia-smi -L`` lists (a MIG-partitioned GPU's instances instead of
    the GPU: CUDA runs a process on one instance); none without the driver."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else []


def parse_nvidia_smi(text: str) -> list[str]:
    """The devices of ``nvidia-smi -L``'s output (see ``nvidia_smi_devices``)."""
    gpus: list[list[str]] = []  # per GPU: its own UUID, then its MIG instances' UUIDs
    for line in text.splitlines():
        found = _UUID.search(line)
        if not found:
            continue
        if found.group(1).startswith("GPU-"):
            gpus.append([found.group(1)])
        elif gpus:
            gpus[-1].append(found.group(1))
    return [uuid for gpu in gpus for uuid in (gpu[1:] or gpu)]


def slot_dir() -> Path:
    """``$SHRINKFLOW_GPU_SLOT_DIR``, else ``/tmp/shrinkflow-<uid>-gpu-slots``: per user, on the
    machine's own disk, and the same for every process of that user (not $TMPDIR, which a
    scheduler may set per job, nor $XDG_RUNTIME_DIR, removed at logout under a running job).
    One folder level, created by its user only: nobody else can swap the lock files."""
    chosen = os.environ.get(DIR_ENV)
    folder = Path(chosen) if chosen else Path(f"/tmp/shrinkflow-{os.getuid()}-gpu-slots")
    folder.mkdir(mode=0o700, parents=bool(chosen), exist_ok=True)
    owner = folder.lstat()
    if folder.is_symlink() or owner.st_uid != os.getuid():
        raise ShrinkflowError(
            f"{folder}: GPU slot folder is a link or another user's; remove it or set {DIR_ENV}"
        )
    if not chosen:
        folder.chmod(0o700)  # even where an older run or a umask left it open
    return folder


def _under_scheduler() -> bool:
    """Whether a scheduler chose this job's GPUs: a Slurm job, unless the user set the jobs
    per GPU explicitly (the local gpu profile run inside one Slurm allocation)."""
    return "SLURM_JOB_ID" in os.environ and JOBS_PER_GPU_ENV not in os.environ


def hold_gpu_slots(gpus: int = 1, wait_s: float | None = None, poll_s: float = POLL_S) -> list[str]:
    """Take one slot on each of ``gpus`` GPUs (0: the job does not train on a GPU) before CUDA
    starts, and pin this process to them; the devices held, or [] where nothing is done (see
    the module's docstring). Waits while every slot is taken, up to ``wait_s`` seconds (None:
    as long as it takes), then raises a ShrinkflowError."""
    if _held:  # a second stage run in this process (tests): the same GPUs
        _pin(_held)
        return [slot.device for slot in _held]
    per_gpu = jobs_per_gpu()
    if gpus < 1 or per_gpu == 0 or SLOT_ENV in os.environ or _under_scheduler():
        return []
    devices = visible_devices()
    if len(devices) < gpus:
        return []  # too few GPUs to pin: the backend says so where it needs them
    folder = slot_dir()
    start = time.monotonic()
    said = False
    while True:
        taken, holders = _try_take(folder, devices, per_gpu, gpus)
        if taken:
            _held.extend(taken)
            _pin(taken)
            if per_gpu > 1:
                os.environ.setdefault(TF_GROWTH_ENV, "true")
            say(f"gpu slot: {', '.join(s.name for s in taken)} ({per_gpu} job(s) per GPU)")
            return [slot.device for slot in taken]
        waited = time.monotonic() - start
        full = (
            f"all {len(devices) * per_gpu} GPU slots are taken ({len(devices)} GPU(s) x "
            f"{JOBS_PER_GPU_ENV}={per_gpu}; held by pid {', '.join(holders) or '?'})"
        )
        if wait_s is not None and waited >= wait_s:
            raise ShrinkflowError(f"{full}; gave up after {waited:.0f} s")
        if not said:
            say(f"gpu slot: {full}; waiting for one (in {folder})")
            said = True
        time.sleep(poll_s)


def total_slots() -> int:
    """GPUs x jobs per GPU: the ``gpu_slots`` a Snakemake run on this machine may hand out
    (workflow/profiles/gpu)."""
    devices = visible_devices()
    if not devices:
        raise ShrinkflowError(
            "workflow/profiles/gpu: no GPU found (CUDA_VISIBLE_DEVICES is empty or nvidia-smi "
            "-L lists none); use workflow/profiles/local"
        )
    return len(devices) * max(jobs_per_gpu(), 1)


def _pin(slots: list[Slot]) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot.device for slot in slots)
    os.environ[SLOT_ENV] = ",".join(slot.name for slot in slots)


def _try_take(
    folder: Path, devices: list[str], per_gpu: int, gpus: int
) -> tuple[list[Slot], list[str]]:
    """Under ``claim.lock``: a free slot on each of the ``gpus`` least-loaded GPUs that have
    one (ties: CUDA_VISIBLE_DEVICES order), or nothing and the pids holding the slots."""
    lock = os.open(folder / "claim.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        loads: dict[str, int] = {}
        free: dict[str, Slot] = {}
        holders: list[str] = []
        for device in devices:
            loads[device] = 0
            key = _file_key(device)
            indices = {int(p.suffix[1:]) for p in folder.glob(f"{key}.*") if p.suffix[1:].isdigit()}
            for index in sorted(indices | set(range(per_gpu))):
                fd = os.open(folder / f"{key}.{index}", os.O_RDWR | os.O_CREAT, 0o600)
                if _lock(fd):
                    if index < per_gpu and device not in free:
                        free[device] = Slot(device, index, fd)
                        continue
                    fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    loads[device] += 1
                    holders.append(os.pread(fd, 32, 0).decode(errors="replace").strip())
                os.close(fd)
        ranked = sorted(free, key=lambda d: (loads[d], devices.index(d)))
        chosen = ranked[:gpus] if len(ranked) >= gpus else []
        for device, slot in free.items():
            if device in chosen:
                os.ftruncate(slot.fd, 0)
                os.pwrite(slot.fd, str(os.getpid()).encode(), 0)
            else:
                os.close(slot.fd)  # closing drops its lock
        return [free[d] for d in chosen], holders
    finally:
        os.close(lock)


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _file_key(device: str) -> str:
    """A device name as a file name (UUIDs and indices are already safe; anything else is
    made so)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", device)
