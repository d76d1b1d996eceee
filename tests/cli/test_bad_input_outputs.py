"""Outputs that would lose the user's work (issue #27): batch output names that collide or escape, a bad
entry in a batch folder, export over a file fgcompile did not write, compile and demo over a compiled folder
that holds the user's files, a full disk and a read-only folder. Each is refused (exit 2, or one failed row
of a batch) with a message that names the problem and the fix, and leaves the user's files as they were."""
import contextlib
import errno
import json
import os
import re
import shutil
import subprocess

import onnx
import pytest

from conftest import MODELS
from fgcompile import folder
from test_bad_input_catalogue import CNN, TRAIN, invoke, refused, snapshot

ATTN = MODELS / "digits_attn" / "w8a8.onnx"


def batch_rows(out):
    return {r["model"]: r for r in json.loads((out / "summary.json").read_text())}


def compiled_from(out, model) -> bool:
    """Whether OUT is a compiled folder with a loadable train.onnx, written from the file MODEL."""
    onnx.load(str(out / "train.onnx"))
    return folder.marker(out).get("source") == os.path.realpath(model)


def test_batch_output_names_that_collide_or_escape_fail_before_anything_is_compiled(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name, model in {"summary.json.onnx": CNN, "summary.json_model.onnx": ATTN, "..onnx": CNN,
                        "...onnx": CNN, "good.onnx": CNN}.items():
        shutil.copy(model, src / name)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    r = invoke("batch", src, "-o", out, "--m", 1, "--jobs", 1)
    assert r.exit_code == 1, r.output
    rows = batch_rows(out)
    assert sorted(rows) == sorted(os.listdir(src))
    assert rows["good.onnx"]["status"] == rows["summary.json_model.onnx"]["status"] == "ok"
    assert compiled_from(out / "summary.json_model", src / "summary.json_model.onnx")
    assert compiled_from(out / "good", src / "good.onnx")
    collided = rows["summary.json.onnx"]
    assert collided["status"] == "error" and "summary.json_model.onnx" in collided["error"], collided
    assert "Rename one of the two models" in collided["error"]
    for name in ("..onnx", "...onnx"):
        assert rows[name]["status"] == "error" and "Rename the model" in rows[name]["error"], rows[name]
        assert "internal error" not in rows[name]["error"]
    # the output root is no compiled folder, and nothing appeared beside it
    assert sorted(os.listdir(out)) == ["good", "summary.json", "summary.json_model"]
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_batch_a_symlink_loop_or_odd_entry_is_one_failed_row(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(CNN, src / "good.onnx")
    (src / "loop.onnx").symlink_to("loop.onnx")
    (src / "dangling.onnx").symlink_to("nowhere.onnx")
    (src / "folder.onnx").mkdir()
    os.mkfifo(src / "pipe.onnx")
    r = invoke("batch", src, "-o", tmp_path / "out", "--m", 1, "--jobs", 2)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    rows = batch_rows(tmp_path / "out")
    assert sorted(rows) == sorted(os.listdir(src))
    assert rows["good.onnx"]["status"] == "ok" and compiled_from(tmp_path / "out" / "good", src / "good.onnx")
    assert "symbolic links" in rows["loop.onnx"]["error"]
    assert "no such file" in rows["dangling.onnx"]["error"]
    assert "is a folder" in rows["folder.onnx"]["error"] and "is a FIFO" in rows["pipe.onnx"]["error"]


def test_batch_fails_an_ok_row_whose_folder_another_model_replaced(tmp_path, monkeypatch):
    """The net under output_folders: two names that still meet in one folder (as on a case-insensitive disk)."""
    from fgcompile import batch
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(CNN, src / "A.onnx")
    shutil.copy(ATTN, src / "b.onnx")
    monkeypatch.setattr(batch, "output_folders", lambda models, out: {m: out / "a" for m in models})
    r = invoke("batch", src, "-o", tmp_path / "out", "--m", 1, "--jobs", 1)
    assert r.exit_code == 1, r.output
    rows = batch_rows(tmp_path / "out")
    assert rows["b.onnx"]["status"] == "ok" and compiled_from(tmp_path / "out" / "a", src / "b.onnx")
    assert rows["A.onnx"]["status"] == "error" and "another model of this batch wrote" in rows["A.onnx"]["error"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "out"
    assert invoke("compile", CNN, "-o", out, "--m", 1).exit_code == 0
    assert invoke("train", out, "--data", TRAIN, "--epochs", 1, "--quiet").exit_code == 0
    return out


def test_export_replaces_only_a_model_fgcompile_exported(tmp_path, trained):
    shutil.copy(TRAIN, tmp_path / "train.npz")
    (tmp_path / "notes.txt").write_text("the user's work")
    shutil.copy(CNN, tmp_path / "theirs.onnx")   # an ONNX model, but not one fgcompile exported
    (tmp_path / "link.onnx").symlink_to("elsewhere.onnx")
    before = snapshot(tmp_path)
    for name in ("train.npz", "notes.txt", "theirs.onnx", "link.onnx"):
        r = invoke("export", trained, "-o", tmp_path / name)
        refused(r, f"{tmp_path / name}: exists and is not a model fgcompile exported")
        assert "--force" in r.output
    assert snapshot(tmp_path) == before and os.readlink(tmp_path / "link.onnx") == "elsewhere.onnx"
    assert invoke("export", trained, "-o", tmp_path / "adapted.onnx").exit_code == 0
    assert invoke("export", trained, "-o", tmp_path / "adapted.onnx").exit_code == 0   # its own export
    assert invoke("export", trained, "-o", tmp_path / "notes.txt", "--force").exit_code == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "notes.txt")))


def test_the_api_export_of_a_model_in_memory_keeps_a_users_file(tmp_path):
    from fgcompile import api
    from fgcompile.errors import OutputError
    (tmp_path / "notes.txt").write_text("the user's work")
    compiled = api.compile_model(CNN, api.TrainSpec(m=1))
    with pytest.raises(OutputError, match="is not a model fgcompile exported"):
        api.export_model(compiled, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "the user's work"
    api.export_model(compiled, tmp_path / "adapted.onnx")
    api.export_model(compiled, tmp_path / "adapted.onnx")   # its own export: replaced


def test_compile_names_the_users_files_in_a_compiled_folder_and_keeps_them(tmp_path):
    out = tmp_path / "out"
    assert invoke("compile", CNN, "-o", out, "--m", 1).exit_code == 0
    (out / "notes.txt").write_text("the user's work")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_bytes(b"png")
    kept = snapshot(out)
    r = invoke("compile", CNN, "-o", out, "--m", 2)
    refused(r, "holds files fgcompile did not write (notes.txt, plots)")
    assert "--force" in r.output and snapshot(out) == kept
    assert invoke("compile", CNN, "-o", out, "--m", 2, "--force").exit_code == 0
    assert not (out / "notes.txt").exists()


def test_a_second_demo_keeps_the_users_files(tmp_path):
    demo = tmp_path / "demo"   # what a first demo leaves (its compiled folder), plus the user's file in it
    assert invoke("compile", CNN, "-o", demo / "compiled", "--m", 1).exit_code == 0
    (demo / ".fgcompile-folder").write_text(json.dumps({"kind": "demo"}))
    (demo / "compiled" / "notes.txt").write_text("the user's work")
    kept = snapshot(demo)
    r = invoke("demo", "-o", demo, "--epochs", 1, "--quiet")
    refused(r, "holds files fgcompile did not write (notes.txt)")
    assert "--force" in r.output and snapshot(demo) == kept


@contextlib.contextmanager
def mounted(path, options):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path):
    """Fill the file system of PATH to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)


def test_a_full_disk_is_a_clear_error_that_leaves_everything_as_it_was(tmp_path, trained):
    with mounted(tmp_path / "disk", "size=1m") as disk:
        shutil.copytree(trained, disk / "out")
        fill(disk / "filler")
        kept = snapshot(disk)
        for args in (["compile", CNN, "-o", disk / "new", "--m", 1],
                     ["train", disk / "out", "--data", TRAIN, "--epochs", 2, "--quiet", "--resume",
                      "--allow-changed-run"],
                     ["export", disk / "out", "-o", disk / "adapted.onnx"],
                     ["tune", disk / "out", "--data", TRAIN, "--epochs", 1, "--folds", 2]):
            r = invoke(*args)
            if args[0] != "tune":   # tune prints its trials before it writes
                refused(r, "no space left on the device")
            assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: "), r.output
            assert re.search(r"needs [0-9.]+ (B|KiB) and \S+ has 0 B free; it is left as it was", r.output), r.output
            assert snapshot(disk) == kept, args[0]
            assert sorted(os.listdir(disk)) == ["filler", "out"] and not any(
                ".fgcompile-" in p.name and p.name != ".fgcompile-folder" for p in (disk / "out").iterdir())
        os.remove(disk / "filler")   # with room again, the folder still trains and exports
        assert invoke("train", disk / "out", "--data", TRAIN, "--epochs", 2, "--quiet", "--resume",
                      "--allow-changed-run").exit_code == 0
        assert invoke("export", disk / "out", "-o", disk / "adapted.onnx").exit_code == 0


def test_no_space_from_the_writer_itself_is_reported_with_its_size(tmp_path, trained, monkeypatch):
    """Without a mount: the low-level write raises ENOSPC (as on a quota, EDQUOT)."""
    import pathlib
    real = pathlib.Path.write_bytes

    def full(self, data):
        if ".fgcompile-" in self.name:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(self, data)
    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    r = invoke("export", trained, "-o", tmp_path / "adapted.onnx")
    refused(r, f"{tmp_path / 'adapted.onnx'}: no space left on the device (or quota exceeded)")
    assert re.search(r"needs [0-9.]+ KiB", r.output) and os.listdir(tmp_path) == []


def test_demo_in_a_read_only_folder_names_it_and_suggests_o(tmp_path, monkeypatch):
    with mounted(tmp_path / "ro", "ro,size=64k") as ro:
        monkeypatch.chdir(ro)
        r = invoke("demo", "--epochs", 1, "--quiet")
        refused(r, f"{ro / 'fgcompile-demo'}: cannot write here (Read-only file system)")
        assert "-o DIR" in r.output and os.listdir(ro) == []


def test_batch_keeps_a_summary_json_and_a_file_it_did_not_write(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(CNN, src / "a.onnx")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text('{"the user\'s": "numbers"}')
    (tmp_path / "file").write_text("the user's work")
    before = snapshot(tmp_path)
    refused(invoke("batch", src, "-o", tmp_path / "out"), "is not a summary fgcompile batch wrote")
    refused(invoke("batch", src, "-o", tmp_path / "file"), "exists and is not a folder")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "summary.json").symlink_to("elsewhere.json")
    refused(invoke("batch", src, "-o", tmp_path / "linked"), "is not a summary fgcompile batch wrote")
    (tmp_path / "folder" / "summary.json").mkdir(parents=True)
    refused(invoke("batch", src, "-o", tmp_path / "folder"), "is a folder where batch writes its summary")
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path / "out")) == ["summary.json"]
    assert os.readlink(tmp_path / "linked" / "summary.json") == "elsewhere.json"
    assert os.listdir(tmp_path / "folder") == ["summary.json"]


def test_batch_into_a_read_only_folder_fails_before_compiling(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(CNN, src / "a.onnx")
    with mounted(tmp_path / "ro", "ro,size=64k") as ro:
        refused(invoke("batch", src, "-o", ro / "out"), f"{ro / 'out'}: cannot write here (Read-only file system)")
        assert os.listdir(ro) == []
