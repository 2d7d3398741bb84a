"""Size `prepare`'s work to the machine: how many images to decode at once within the memory
available (cgroup limit included), and whether the prepared arrays fit on the disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from src.errors import StageError

MAX_WORKERS = 4


BYTES_PER_PIXEL_WORST = 4 * 3  # RGBA, and up to three copies while converting


DISK_MARGIN = 64 * 2**20


def _cgroup_available() -> int | None:
    """Memory left under this process's cgroup (v2) limit, reclaimable file cache counted as
    free; None without a limit."""
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
        stat = dict(line.split()[:2] for line in (folder / "memory.stat").read_text().splitlines())
        return max(0, int(limit) - used + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):
        return None


def _available_memory() -> int | None:
    """Bytes of memory available now (MemAvailable, or free pages; capped by a cgroup limit),
    None if unknown."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    in_cgroup = _cgroup_available()
    return available if in_cgroup is None else min(available, in_cgroup)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def decode_workers(max_pixels: int) -> int:
    """Decoding threads: at most 4, one per CPU, and as many worst-case images as fit in memory."""
    available = _available_memory()
    by_memory = MAX_WORKERS if available is None else available // (max_pixels * BYTES_PER_PIXEL_WORST)
    return max(1, min(MAX_WORKERS, _cpu_count(), by_memory))


def check_disk(folder: Path, sizes: list[int], image_size: int) -> None:
    """Refuse to start when `folder` lacks room for the split arrays (plus one compaction copy)."""
    row = image_size * image_size * 3
    arrays = sum(sizes) * row
    needed = arrays + max(sizes) * row + DISK_MARGIN
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StageError(
            f"not enough disk space in {folder}: the image arrays need {needed:,} bytes "
            f"({needed / 2**30:.2f} GiB: {arrays:,} for {sum(sizes)} images at {image_size} px, "
            f"room to compact the largest split and a margin), {free:,} bytes are available; "
            "free some space, or lower dataset.image_size or dataset.limit_per_class"
        )
