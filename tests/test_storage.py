"""Atomic writes: the final name holds either the old file or the whole new one, and the new one gets the
mode a plain open() or mkdir() would give it under the process umask (not mkstemp's 0600)."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from components.storage import atomic_path, staged_dir, write_json

REPO = Path(__file__).resolve().parent.parent

WRITE_EVERY_KIND = """
import sys
from pathlib import Path
import polars as pl
from components.storage import staged_dir, write_json, write_metrics, write_parquet, write_text
out = Path(sys.argv[1])
write_json({"a": 1}, out / "models" / "pointer.json")
write_metrics({"ne": 0.9, "config": {"k": "v"}}, out / "metrics" / "ranker.json", out / "reports" / "record.json")
write_parquet(pl.DataFrame({"x": [1, 2]}), out / "data" / "table.parquet")
write_text("<html></html>", out / "reports" / "page.html")
with staged_dir(out / "data" / "staged") as tmp:
    (tmp / "part-0.parquet").write_bytes(b"x")
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_artifacts_get_the_umask_mode_not_0600(tmp_path, umask):
    subprocess.run([sys.executable, "-c", WRITE_EVERY_KIND, str(tmp_path)], check=True, cwd=REPO,
                   preexec_fn=lambda: os.umask(umask))
    files = ["models/pointer.json", "metrics/ranker.json", "reports/record.json", "data/table.parquet",
             "reports/page.html"]
    for name in files:
        assert mode(tmp_path / name) == 0o666 & ~umask, name
    assert mode(tmp_path / "data" / "staged") == 0o777 & ~umask
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "no temporary file is left behind"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "pointer.json"
    write_json({"version": "old"}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"version": "ne')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "version": "old"\n}\n'
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_staged_dir_leaves_the_old_directory(tmp_path):
    store = tmp_path / "store"
    with staged_dir(store) as tmp:
        pl.DataFrame({"x": [1]}).write_parquet(tmp / "part-0.parquet")
    with pytest.raises(RuntimeError), staged_dir(store) as tmp:
        (tmp / "part-0.parquet").write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert pl.read_parquet(store / "part-0.parquet")["x"].to_list() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["store"]
