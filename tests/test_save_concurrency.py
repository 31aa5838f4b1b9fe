"""Saves that cannot clobber: concurrent processes, a crash between the renames, the working folder, symlinks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vit_vq import ViTVQConfig, ViTVQTokenizer

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (1, 2, 3, 4)

# Saves argv[3] times into argv[1], starting when the file argv[4] appears (both savers overlap).
SAVER = """
import os, sys, time, torch
from vit_vq import ViTVQConfig, ViTVQTokenizer
torch.manual_seed(int(sys.argv[2]))
tok = ViTVQTokenizer(ViTVQConfig.from_preset("tiny"))
print("ready", flush=True)
while not os.path.exists(sys.argv[4]):
    time.sleep(0.005)
for _ in range(int(sys.argv[3])):
    tok.save_pretrained(sys.argv[1])
"""

# Dies (os._exit, no cleanup) between the two renames of a save: the folder has become
# `.m.old-*` and the complete new copy is still `.m.tmp-*`.
CRASHER = """
import os, sys, torch
import vit_vq.saving as saving
from vit_vq import ViTVQConfig, ViTVQTokenizer
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if ".old-" in os.fspath(dst):
        os._exit(9)
saving.os.replace = replace
torch.manual_seed(1)
ViTVQTokenizer(ViTVQConfig.from_preset("tiny", codebook_size=512)).save_pretrained(sys.argv[1])
"""


def _python(code: str, *args: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tiny(seed: int = 0, **overrides) -> ViTVQTokenizer:
    torch.manual_seed(seed)
    return ViTVQTokenizer(ViTVQConfig.from_preset("tiny", **overrides))


def _leftovers(folder: Path) -> list[str]:
    hidden = (p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))
    return sorted(name for name in hidden if not name.endswith(".lock"))


def test_processes_saving_40_times_each_into_one_folder_keep_the_user_files_and_a_loadable_folder(tmp_path):
    """Four savers, not two: on a 2-core machine two unlocked savers collided in only some runs."""
    folder = tmp_path / "model"
    _tiny().save_pretrained(folder)
    (folder / "notes.txt").write_text("keep me")
    (folder / "logs").mkdir()
    for i in range(20):  # more user files: a longer copy phase, a wider race window without the lock
        (folder / "logs" / f"{i}.txt").write_text(str(i))
    go = tmp_path / "go"
    procs = [_python(SAVER, folder, seed, 40, go) for seed in SEEDS]
    for proc in procs:
        assert proc.stdout.readline() == "ready\n", proc.communicate()[1][-3000:]
    go.touch()
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(int(p.stem) for p in (folder / "logs").iterdir()) == list(range(20))
    loaded = ViTVQTokenizer.from_pretrained(folder)
    # the folder holds one of the two savers' weights, whole (checked against each saver's own model)
    stored = load_file(folder / "model.safetensors")["quantizer.embed"]
    assert any(torch.equal(stored, _tiny(seed).quantizer.embed) for seed in SEEDS)
    assert torch.equal(loaded.quantizer.embed, stored)
    assert _leftovers(folder) == []


def test_a_crash_between_the_renames_is_recovered_by_the_next_load(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    (folder / "notes.txt").write_text("keep me")
    proc = _python(CRASHER, folder)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 9, err[-3000:]
    assert not folder.exists() and len(_leftovers(folder)) == 2  # the old copy and the new one, hidden
    loaded = ViTVQTokenizer.from_pretrained(folder)
    assert loaded.config.codebook_size == 256  # the last completed save
    assert torch.equal(loaded.quantizer.embed, _tiny().quantizer.embed)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert _leftovers(folder) == []


def test_a_crash_between_the_renames_is_recovered_by_the_next_save(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    (folder / "notes.txt").write_text("keep me")
    proc = _python(CRASHER, folder)
    assert proc.wait(timeout=300) == 9
    assert not folder.exists()
    _tiny(3, codebook_size=128).save_pretrained(folder)
    assert ViTVQTokenizer.from_pretrained(folder).config.codebook_size == 128
    assert (folder / "notes.txt").read_text() == "keep me"
    assert _leftovers(folder) == []


def test_stale_temporaries_are_cleaned_by_the_next_save(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    stale = tmp_path / ".m.tmp-killed1"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100_000)  # half-written by a killed save
    (tmp_path / ".m.trash-abcd1234").mkdir()
    (tmp_path / ".m.old-abcd1234").mkdir()  # an old copy whose deletion was interrupted
    _tiny(1).save_pretrained(folder)
    assert _leftovers(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_saving_into_the_working_folder_or_above_it_is_refused(tmp_path, monkeypatch):
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    (work / "data.txt").write_text("user data")
    monkeypatch.chdir(work)
    tok = _tiny()
    for target, why in ((".", "is the current working folder"), ("..", "holds the current working folder"),
                        (str(tmp_path), "holds the current working folder")):
        with pytest.raises(ValueError, match=f"refusing to save into .*: it {why}"):
            tok.save_pretrained(target)
    assert Path.cwd() == work and Path(".").resolve() == work
    assert sorted(p.name for p in work.iterdir()) == ["data.txt"]
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["work"]
    tok.save_pretrained("sub")  # a subfolder is fine
    assert ViTVQTokenizer.from_pretrained("sub").config.codebook_size == 256


def test_a_symlinked_target_stays_a_link_to_the_updated_real_folder(tmp_path):
    real = tmp_path / "store" / "real-model"
    _tiny().save_pretrained(real)
    (real / "notes.txt").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(real)
    _tiny(1, codebook_size=128).save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert ViTVQTokenizer.from_pretrained(real).config.codebook_size == 128
    assert (real / "notes.txt").read_text() == "keep me"
    assert _leftovers(real) == []


def test_user_files_are_carried_as_links_not_copies(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    (folder / "data.bin").write_bytes(b"x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "a.txt").write_text("a")
    (folder / "latest").symlink_to("sub")
    inode = (folder / "data.bin").stat().st_ino
    _tiny(1).save_pretrained(folder)
    assert (folder / "data.bin").stat().st_ino == inode  # hard-linked, no second copy of the data
    assert (folder / "latest").is_symlink() and os.readlink(folder / "latest") == "sub"
    assert (folder / "sub" / "a.txt").read_text() == "a"


def _crash_between_the_renames(folder: Path) -> Path:
    """The state a crash between the two renames leaves: `mv <folder> .<name>.old-1234` (no new copy yet)."""
    old = folder.with_name(f".{folder.name}.old-1234")
    os.replace(folder, old)
    return old


@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the Hub was called"))


@pytest.mark.parametrize("name", ["sc/m", "m"])
def test_a_hub_shaped_name_of_a_folder_lost_mid_save_is_recovered(tmp_path, monkeypatch, no_hub, name):
    monkeypatch.chdir(tmp_path)
    tok = _tiny(2)
    tok.save_pretrained(name)
    _crash_between_the_renames(Path(name))
    loaded = ViTVQTokenizer.from_pretrained(name)
    assert torch.equal(loaded.quantizer.embed, tok.quantizer.embed)
    assert Path(name).is_dir() and _leftovers(tmp_path / name) == []


def test_a_hub_shaped_name_with_only_a_stale_temporary_still_goes_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / ".m.tmp-killed1").mkdir()  # a first save that never finished: nothing to restore
    def download(repo_id, **kwargs):
        raise LookupError(f"asked the Hub for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(LookupError, match="asked the Hub for sc/m"):
        ViTVQTokenizer.from_pretrained("sc/m")


@pytest.mark.parametrize("spelling", ["./sc/link", "sc/link"])
def test_a_link_to_a_folder_lost_mid_save_is_followed_and_recovered(tmp_path, monkeypatch, no_hub, spelling):
    monkeypatch.chdir(tmp_path)
    tok = _tiny(3)
    tok.save_pretrained("sc/m")
    (tmp_path / "sc" / "link").symlink_to("m")
    _crash_between_the_renames(tmp_path / "sc" / "m")
    assert os.path.lexists(spelling) and not os.path.exists(spelling)  # dangling until recovered
    loaded = ViTVQTokenizer.from_pretrained(spelling)
    assert torch.equal(loaded.quantizer.embed, tok.quantizer.embed)
    assert (tmp_path / "sc" / "m").is_dir() and (tmp_path / "sc" / "link").is_symlink()


def test_a_250_character_folder_name_saves_twice_and_loads(tmp_path):
    from vit_vq.saving import lock_path

    folder = tmp_path / ("n" * 250)
    _tiny(1).save_pretrained(folder)
    (folder / "notes.txt").write_text("keep me")
    tok = _tiny(4)
    tok.save_pretrained(folder)  # swaps through the hidden .old-* / .trash-* names
    assert torch.equal(ViTVQTokenizer.from_pretrained(folder).quantizer.embed, tok.quantizer.embed)
    assert (folder / "notes.txt").read_text() == "keep me"
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == [lock_path(folder).name] and len(hidden[0]) <= 255
    assert lock_path(tmp_path / ("n" * 249 + "x")) != lock_path(folder)  # long names differ by their hash


def test_a_250_character_folder_lost_mid_save_is_recovered(tmp_path):
    folder = tmp_path / ("é" * 120)  # 240 bytes in UTF-8
    tok = _tiny(5)
    tok.save_pretrained(folder)
    from vit_vq.saving import stem

    os.replace(folder, tmp_path / f".{stem(folder)}.old-1234")
    assert torch.equal(ViTVQTokenizer.from_pretrained(folder).quantizer.embed, tok.quantizer.embed)


def test_a_readme_the_user_wrote_survives_saves_byte_identical(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    mine = b"# My tokenizer\n\nlibrary_name: vit_vq (notes I wrote by hand)\n" + bytes(range(256))
    (folder / "README.md").write_bytes(mine)
    _tiny(1, codebook_size=128).save_pretrained(folder)
    assert (folder / "README.md").read_bytes() == mine
    assert ViTVQTokenizer.from_pretrained(folder).config.codebook_size == 128
    _tiny(1).save_pretrained(folder, model_card_kwargs={"extra": "asked for"})  # an explicit card replaces it
    assert "asked for" in (folder / "README.md").read_text()


def test_our_own_card_is_refreshed_by_the_next_save(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    assert "codebook of 256 codes" in (folder / "README.md").read_text()
    _tiny(1, codebook_size=128).save_pretrained(folder)
    assert "codebook of 128 codes" in (folder / "README.md").read_text()


@pytest.mark.timeout(60)
def test_a_readme_that_is_a_fifo_or_a_link_is_kept_and_never_opened(tmp_path):
    folder = tmp_path / "m"
    _tiny().save_pretrained(folder)
    (folder / "README.md").unlink()
    os.mkfifo(folder / "README.md")  # opening it would block: has_user_card only lstat()s it
    _tiny(1).save_pretrained(folder)
    assert (folder / "README.md").is_fifo()
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to("/etc/hostname")
    _tiny(2).save_pretrained(folder)
    assert os.readlink(folder / "README.md") == "/etc/hostname"
