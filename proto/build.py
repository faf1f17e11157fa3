"""Generates the *_pb2.py / *_pb2_grpc.py stubs from the .proto files: `python -m stagemesh.proto.build`.

The .proto files import each other as `stagemesh/proto/x.proto`, so the generated modules import
`stagemesh.proto.x_pb2`: the include root is a temporary folder whose `stagemesh/proto` is this folder.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def proto_files(directory: Path = PROTO_DIR) -> list[Path]:
    return sorted(directory.glob("*.proto"))


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Writes the stubs for every .proto in proto_dir into out_dir; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "stagemesh" / "proto").mkdir(parents=True)
        for f in proto_files(proto_dir):
            shutil.copy(f, root / "stagemesh" / "proto" / f.name)
        gen = root / "gen"
        gen.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={gen}", f"--grpc_python_out={gen}"]
        args += [f"stagemesh/proto/{f.name}" for f in proto_files(proto_dir)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for f in sorted((gen / "stagemesh" / "proto").glob("*_pb2*.py")):
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
        return written


if __name__ == "__main__":
    for path in generate(PROTO_DIR):
        print(f"wrote {path.relative_to(PROTO_DIR.parent)}", file=sys.stderr)
