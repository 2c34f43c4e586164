"""peft_bayes.io's writers: a write that fails leaves the earlier outputs as they were and no temporary folder."""

from __future__ import annotations

import os

import pytest

from peft_bayes.io import write_files_into, write_folder_atomically


def _files(folder) -> dict[str, str]:
    return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))}


def test_write_files_into_replaces_what_it_wrote_and_keeps_the_rest(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.txt").write_text("old a")
    (folder / "keep.txt").write_text("kept")

    def write(tmp):
        open(os.path.join(tmp, "a.txt"), "w").write("new a")
        open(os.path.join(tmp, "b.txt"), "w").write("new b")

    assert write_files_into(str(folder), write, ".w-") == str(folder)
    assert _files(folder) == {"a.txt": "new a", "b.txt": "new b", "keep.txt": "kept"}


def test_write_files_into_moves_from_a_returned_subfolder(tmp_path):
    def write(tmp):
        os.makedirs(os.path.join(tmp, "named"))
        open(os.path.join(tmp, "named", "adapter.json"), "w").write("{}")
        open(os.path.join(tmp, "stray.txt"), "w").write("not moved")
        return os.path.join(tmp, "named")

    write_files_into(str(tmp_path / "out"), write)
    assert _files(tmp_path / "out") == {"adapter.json": "{}"}


@pytest.mark.parametrize("writer", [write_files_into, write_folder_atomically])
def test_a_failing_write_leaves_the_earlier_outputs_and_no_temporary_folder(tmp_path, writer):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.txt").write_text("old a")

    def write(tmp):
        open(os.path.join(tmp, "a.txt"), "w").write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        writer(str(folder), write)
    assert _files(folder) == {"a.txt": "old a"}
    assert sorted(os.listdir(tmp_path)) == ["out"]
