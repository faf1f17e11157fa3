"""The machine a benchmark ran on, recorded beside its numbers: CPU model, cores, memory, library versions."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    import psutil
    import torch

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": hf,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return (
        f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB{gpu}; Python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}; {m['date']}"
    )
