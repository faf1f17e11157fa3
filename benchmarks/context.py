"""What the cases of one benchmark run share: the suite, the checkpoints, where logs go, the in-process
models (loaded once, dropped when no longer needed), the plot series the cases fill in, the progress bar."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from stagemesh.benchmarks.suite import Suite
from stagemesh.deploy.commands import MeshLayout
from stagemesh.deploy.launcher import LocalMesh

THREADS = 2  # the rows are defined for 2 cores: in-process sides use 2 torch threads, meshes 1 or 2 per worker


@dataclass
class BenchContext:
    suite: Suite
    llama: str  # checkpoint directories
    mixtral: str
    out: Path
    advance: Callable[[str], None] = lambda what: None  # moves the progress bar one measurement on
    series: dict[str, dict] = field(default_factory=dict)  # plot -> label -> data
    _models: dict[str, object] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        path = self.out / "logs" / "mesh.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def model(self, key: str, load: Callable[[], object]) -> object:
        """The in-process model `key`, loaded on first use."""
        if key not in self._models:
            self._models[key] = load()
        return self._models[key]

    def drop(self, *keys: str) -> None:
        for key in keys:
            self._models.pop(key, None)

    def layout(self, model_dir: str, tp: int = 1, pp: int = 1, ep: int = 0, threads: int = 1) -> MeshLayout:
        """A float32 CPU mesh with `threads` torch threads in every worker; pipelines use `--layers balanced`."""
        return MeshLayout(
            model_dir,
            tp,
            pp,
            ep,
            layers="balanced" if pp > 1 else None,
            threads=threads,
            kv_memory="256MiB",
            dtype="float32",
            max_step_tokens=512,
            metrics_port=None,
        )

    @contextlib.contextmanager
    def mesh(self, layout: MeshLayout) -> Iterator[LocalMesh]:
        from stagemesh.benchmarks.meshes import running_mesh

        with running_mesh(layout, self.log_path) as mesh:
            yield mesh

    def add_series(self, plot: str, label: str, data) -> None:
        self.series.setdefault(plot, {})[label] = data


def make_prompt(length: int, seed: int, vocab: int) -> list[int]:
    """Deterministic token ids in [3, vocab): no special tokens, different per seed."""
    return [3 + (seed * 7919 + i * 131) % (vocab - 3) for i in range(length)]
