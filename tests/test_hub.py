"""Save/load round trips, atomic saves, strict loading, the Hub cache and push_to_hub over loopback HTTP."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

import vit_vq.saving as vsaving
from vit_vq import ViTVQConfig, ViTVQTokenizer


@pytest.fixture
def tok():
    torch.manual_seed(0)
    t = ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).train()
    t(torch.rand(4, 3, 32, 32))  # move EMA state away from its init
    return t.eval()


def test_round_trip_gives_bitwise_identical_indices_and_no_pickles(tok, tmp_path):
    x = torch.rand(4, 3, 32, 32)
    tok.save_pretrained(tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in {".bin", ".pt", ".pkl", ".pth"}]
    loaded = ViTVQTokenizer.from_pretrained(tmp_path / "model")
    assert not loaded.training
    assert torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.equal(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    # the file is read back independently of our loader
    state = load_file(tmp_path / "model" / "model.safetensors")
    assert torch.equal(state["quantizer.embed"], tok.quantizer.embed)
    assert not any(k.startswith(("embeddings.", "layers.", "encoder.layer.")) for k in state)
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["codebook_size"] == 256
    card = (tmp_path / "model" / "README.md").read_text()
    assert "library_name: vit_vq" in card and "image-tokenizer" in card


def test_save_is_atomic_a_crash_leaves_the_old_model_whole(tok, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    tok.save_pretrained(folder)
    (folder / "notes.txt").write_text("keep me")
    old_weights = (folder / "model.safetensors").read_bytes()
    old_config = (folder / "config.json").read_text()
    other = ViTVQTokenizer(ViTVQConfig.from_preset("tiny", codebook_size=512))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(vsaving, "swap_in", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == old_weights
    assert (folder / "config.json").read_text() == old_config
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # no temp folder left behind
    monkeypatch.undo()
    other.save_pretrained(folder)
    assert ViTVQTokenizer.from_pretrained(folder).config.codebook_size == 512
    assert (folder / "notes.txt").read_text() == "keep me"


def test_missing_local_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder: '.*nope'"):
        ViTVQTokenizer.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no such folder: './relative/missing'"):
        ViTVQTokenizer.from_pretrained("./relative/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ViTVQTokenizer.from_pretrained(tmp_path / "empty")


def test_truncated_weights_raise_a_clear_error(tok, tmp_path):
    tok.save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m")
    w.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m")


def test_config_that_does_not_match_the_weights_names_the_keys(tok, tmp_path):
    tok.save_pretrained(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["codebook_size"] = 128
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not match its config: .*quantizer\.embed: file \(256, 8\) vs config \(128, 8\)"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m")
    cfg["codebook_size"], cfg["encoder_depth"] = 256, 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"encoder_depth=3 but the weights hold 2 blocks under encoder\.transformer\.blocks\.\*"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m")
    cfg["encoder_depth"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"encoder_depth=1 but the weights hold 2 blocks"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m")
    cfg["encoder_depth"], cfg["mlp_ratio"] = 2, 2.0
    cfg_path.write_text(json.dumps(cfg))
    fc1 = r"decoder\.transformer\.blocks\.0\.mlp\.fc1\.bias: file \(256,\) vs config \(128,\)"
    with pytest.raises(ValueError, match=rf"shape mismatches \[{fc1}"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m")


def _hub_cache(root, repo_id, folder):
    """A real huggingface_hub cache layout: blobs + refs/main + snapshots/<sha>/ symlinks."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/{blob.name}")


def test_from_pretrained_resolves_a_repo_id_through_the_offline_hub_cache(tok, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    tok.save_pretrained(tmp_path / "src")
    cache = tmp_path / "cache"
    _hub_cache(cache, "some-org/some-name", tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    x = torch.rand(2, 3, 32, 32)
    for kwargs in ({}, {"cache_dir": cache}, {"cache_dir": cache, "local_files_only": True}):
        loaded = ViTVQTokenizer.from_pretrained("some-org/some-name", **kwargs)
        assert torch.equal(loaded.encode(x), tok.encode(x))
    missing = r"config\.json of Hub repo 'some-org/other-name' \(revision 'main'\) is not in the local"
    with pytest.raises(FileNotFoundError, match=missing):
        ViTVQTokenizer.from_pretrained("some-org/other-name", cache_dir=cache)


class _FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's HTTP API for `push_to_hub`: create repo, preupload, commit."""

    log: list = []
    files: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.log.append(("POST", self.path, self.headers.get("authorization")))
        base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
        if self.path == "/api/repos/create":
            name = json.loads(body)
            repo_id = f"{name.get('organization')}/{name['name']}" if name.get("organization") else name["name"]
            return self._reply({"url": f"{base}/{repo_id}", "name": repo_id})
        if self.path == "/api/validate-yaml":  # model card metadata check
            return self._reply({"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item.get("key") == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo_id = self.path.split("/api/models/")[1].split("/commit/")[0]
            return self._reply({"commitUrl": f"{base}/{repo_id}/commit/abc", "commitOid": "a" * 40, "pullRequestUrl": None})
        return self._reply({"error": f"unexpected {self.path}"}, status=404)

    def do_GET(self):
        self.log.append(("GET", self.path, None))
        return self._reply({"error": f"unexpected {self.path}"}, status=404)


def test_push_to_hub_uploads_the_saved_folder_over_http(tok, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeHub.log, _FakeHub.files = [], {}
    try:
        monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        tok.push_to_hub("my-org/my-tokenizer", token="hf_test_token")
    finally:
        server.shutdown()
    paths = [p for _, p, _ in _FakeHub.log]
    assert paths[0] == "/api/repos/create"
    assert any("/api/models/my-org/my-tokenizer/commit/main" in p for p in paths)
    assert all(auth == "Bearer hf_test_token" for method, _, auth in _FakeHub.log if method == "POST")
    assert sorted(_FakeHub.files) == ["README.md", "config.json", "model.safetensors"]
    (tmp_path / "pushed").mkdir()
    for name, data in _FakeHub.files.items():
        (tmp_path / "pushed" / name).write_bytes(data)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ViTVQTokenizer.from_pretrained(tmp_path / "pushed").encode(x), tok.encode(x))


def test_a_path_object_is_always_local(tmp_path):
    from pathlib import Path

    with pytest.raises(FileNotFoundError, match="no such folder: 'ckpt/run1'"):
        ViTVQTokenizer.from_pretrained(Path("ckpt/run1"))


def test_saved_folder_keeps_normal_permissions(tok, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        tok.save_pretrained(tmp_path / "fresh")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o755
    os.chmod(tmp_path / "fresh", 0o750)
    tok.save_pretrained(tmp_path / "fresh")
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o750


def test_saved_files_follow_the_umask(tok, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        tok.save_pretrained(tmp_path / "m")
    finally:
        os.umask(umask)
    for name in ("config.json", "model.safetensors", "README.md"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644, name


class _MissingHub(BaseHTTPRequestHandler):
    """A Hub that knows no repo (`RepoNotFound`), or a repo without the file (`EntryNotFound`)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        code = "EntryNotFound" if "/has-no-files/" in self.path else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", f"{code} (fake hub)")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD


@pytest.mark.parametrize(
    "repo_id, match",
    [
        ("some-org/not-there",
         r"Hub repo 'some-org/not-there' not found \(or private: pass token=\.\.\.\); "
         r"for a local folder write './some-org/not-there'"),
        ("some-org/has-no-files", r"Hub repo 'some-org/has-no-files' \(revision 'main'\) has no config\.json"),
    ],
)
def test_a_missing_hub_repo_or_file_is_named(tmp_path, monkeypatch, repo_id, match):
    import huggingface_hub.constants as hc

    server = ThreadingHTTPServer(("127.0.0.1", 0), _MissingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(hc, "ENDPOINT", base)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", base + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        with pytest.raises(FileNotFoundError, match=match):
            ViTVQTokenizer.from_pretrained(repo_id, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()


def test_vit_vq_default_names_the_bundled_model_without_any_hub_call(monkeypatch):
    import huggingface_hub

    from vit_vq.default_model import default_model_dir
    from vit_vq.hub import resolve_model_name

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_hub)
    assert resolve_model_name("vit_vq:default") == default_model_dir()
    tok = ViTVQTokenizer.from_pretrained("vit_vq:default")
    stored = load_file(default_model_dir() / "model.safetensors")
    assert stored.keys() == tok.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in tok.state_dict().items())
    short = ViTVQTokenizer.default().state_dict()
    assert all(torch.equal(short[k], v) for k, v in tok.state_dict().items())
    with pytest.raises(ValueError, match=r"unknown bundled model 'vit_vq:large'; known names: vit_vq:default"):
        ViTVQTokenizer.from_pretrained("vit_vq:large")


@pytest.mark.parametrize("name", ["tokins/", "./tokins", "~/tokins", "runs/a/tokins", "..\\tokins"])
def test_path_shaped_names_stay_local(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the Hub was called"))
    with pytest.raises(FileNotFoundError, match=f"^no such folder: {re.escape(repr(name))}"):
        ViTVQTokenizer.from_pretrained(name)


def test_hub_mixin_keywords(tok, tmp_path):
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="strict=False is not supported: a partial load would silently give a different"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m", strict=False)
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        ViTVQTokenizer.from_pretrained(tmp_path / "m", torch_dtype=torch.int8)
    half = ViTVQTokenizer.from_pretrained(
        tmp_path / "m", torch_dtype=torch.bfloat16, map_location=torch.device("cpu"), strict=True
    )
    assert half.encoder.patch_embed.weight.dtype == torch.bfloat16 and half.decoder.from_code.weight.dtype == torch.bfloat16
    assert half.quantizer.embed.dtype == torch.float32  # the codebook stays float32
    assert torch.equal(half.quantizer.embed, tok.quantizer.embed)
    assert half.decode(tok.encode(torch.rand(1, 3, 32, 32))).dtype == torch.float32
