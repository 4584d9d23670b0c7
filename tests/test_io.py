import pytest

from megaclass.io import atomic_output, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.tsv"
    atomic_write_text(target, "a\n")
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.tsv"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.tsv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tsv"]


def _record_durability_calls(monkeypatch):
    """Wrap os.fsync and os.replace (still doing their work) to log what each touched, in order."""
    import os

    calls, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        calls.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return calls


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = _record_durability_calls(monkeypatch)
    target = tmp_path / "latest"
    atomic_write_text(target, "step-00000002")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    temp = calls[1][1]
    assert calls[0][1] == temp and calls[1][2] == str(target)  # the temp file's data, then its rename
    assert calls[2][1] == str(tmp_path)  # then the folder entry that names it
    assert target.read_text() == "step-00000002"


def test_replace_folder_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    from megaclass.io import replace_folder

    src = tmp_path / ".tmp-step"
    (src / "ds").mkdir(parents=True)
    (src / "ds" / "model.pt").write_bytes(b"x")
    (src / "meta.json").write_text("{}")
    calls = _record_durability_calls(monkeypatch)
    replace_folder(src, tmp_path / "step")
    kinds = [c[0] for c in calls]
    assert kinds.count("replace") == 1 and kinds[-2:] == ["replace", "fsync"]
    before = {c[1] for c in calls[:kinds.index("replace")]}
    assert before == {str(src), str(src / "ds"), str(src / "ds" / "model.pt"), str(src / "meta.json")}
    assert calls[-1][1] == str(tmp_path)
    assert (tmp_path / "step" / "ds" / "model.pt").read_bytes() == b"x"
