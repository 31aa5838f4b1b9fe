"""The built wheel carries the default tokenizer: install it into a fresh venv and run `vit-vq demo` there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLED_FOLDERS, BUNDLED_FILES = ("default", "default_v1"), ("config.json", "model.safetensors", "README.md")
ASSET_FILES = tuple(f"vit_vq/assets/{folder}/{name}" for folder in BUNDLED_FOLDERS for name in BUNDLED_FILES)
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv*", ".data", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
)


def _isolation() -> list[str]:
    """Build in this environment when its setuptools reads pyproject's licence fields (>= 77), else isolated."""
    try:
        major = int(version("setuptools").split(".")[0])
        version("wheel")
    except PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_ships_the_default_tokenizer(tmp_path):
    # build from a copy of the sources, so concurrent builds in the checkout cannot interfere
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation(), "-q", "-w", str(dist), str(src)], timeout=600)
    (wheel,) = dist.glob("vit_vq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(ASSET_FILES) <= names
    assert any(n.startswith("vit_vq/assets/samples/") and n.endswith(".jpg") for n in names)

    # a fresh venv without vit_vq; the heavy dependencies (torch, ...) come from this
    # environment's site-packages through a .pth line, which does not run its editable hook
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    vpython = bindir / "python"
    purelib = Path(_run([str(vpython), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(vpython), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         timeout=600)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    work = tmp_path / "elsewhere"  # outside the repo: nothing can come from the checkout
    work.mkdir()
    where = _run([str(vpython), "-c", "import vit_vq.default_model as d; print(d.__file__); print(d.default_model_dir())"],
                 cwd=work, env=env, timeout=300).stdout.split()
    assert all(Path(w).is_relative_to(purelib) for w in where), where
    demo = _run([str(bindir / "vit-vq"), "demo", "-o", "demo.png", "--device", "cpu"], cwd=work, env=env, timeout=300)
    assert "PSNR" in demo.stdout and (work / "demo.png").stat().st_size > 0
