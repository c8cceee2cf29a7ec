"""watch.filters: names that are never input, the path filter and the scan."""

from __future__ import annotations

from pathlib import Path

import pytest

from digitwatch.watch.filters import Filter, Ignore, ignored_name, scan


@pytest.mark.parametrize(
    "name",
    [
        ".hidden.png",
        "x.png.part",
        "x.tmp",
        "x.PART",
        "big.crdownload",
        "~$doc.png",
        ".syncthing.x.png.tmp",
        "Thumbs.db",
        ".DS_Store",
        ".digitwatch",
        "~syncthing~photo.jpg.tmp",
        "photo.jpg.partial",
        "@eaDir",
        "._photo.jpg",
        "Desktop.ini",
    ],
)
def test_temp_and_hidden_names_are_ignored(name: str) -> None:
    assert ignored_name(name)


@pytest.mark.parametrize("name", ["7.png", "scan 1.JPG", "a.part.png", "tmp.png"])
def test_ordinary_names_are_candidates(name: str) -> None:
    assert not ignored_name(name)


def test_extra_globs_add_to_the_defaults_case_insensitively(tmp_path: Path) -> None:
    ignore = Ignore(["*.raw", "scratch"])
    assert ignore("IMG_1.RAW") and ignore("Scratch") and ignore(".hidden.png")
    assert not ignore("IMG_1.jpg") and not ignored_name("IMG_1.RAW")
    for rel in ["a.png", "b.raw", "scratch/c.png", "sub/@eaDir/d.png", "sub/e.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = sorted(Path(p).name for p in scan(tmp_path, recursive=True, ignore=ignore))
    assert found == ["a.png", "e.png"]
    deep = Filter(tmp_path, recursive=True, ignore=ignore)
    assert deep.relative(f"{tmp_path}/scratch/c.png") is None
    assert deep.relative(f"{tmp_path}/sub/x.RAW") is None
    assert deep.relative(f"{tmp_path}/sub/x.png") == "sub/x.png"


def test_filter_depth_and_state_folder(tmp_path: Path) -> None:
    flat, deep = Filter(tmp_path, recursive=False), Filter(tmp_path, recursive=True)
    assert flat.relative(f"{tmp_path}/a.png") == "a.png"
    assert flat.relative(f"{tmp_path}/sub/a.png") is None
    assert deep.relative(f"{tmp_path}/sub/a.png") == "sub/a.png"
    for f in (flat, deep):
        assert f.relative(f"{tmp_path}/.digitwatch/work/1/x~a.png") is None
        assert f.relative("/elsewhere/a.png") is None
    assert deep.relative(f"{tmp_path}/.cache/a.png") is None


def test_scan_skips_state_hidden_and_depth(tmp_path: Path) -> None:
    for rel in ["a.png", "b.part", ".digitwatch/work/x~c.png", "sub/d.png", ".h/e.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert sorted(Path(p).name for p in scan(tmp_path, recursive=False)) == ["a.png"]
    assert sorted(Path(p).name for p in scan(tmp_path, recursive=True)) == ["a.png", "d.png"]
