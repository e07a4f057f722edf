"""Model files: local paths, the verified cache, Hugging Face / ModelScope downloads against a fake hub on 127.0.0.1."""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from common import assets
from common.assets import ModelFiles, resolve_model_files
from common.config import ModelEntry
from common.errors import ModelFilesError, UnknownModelError
from common.registry import MODELS, get_model
from tests import fakehub

MODEL = "paddleocr-vl"
WEIGHTS = os.urandom(300_000)
SNAPSHOT = {
    "config.json": b'{"model_type": "paddleocr_vl"}',
    "tokenizer.json": b'{"version": "1.0", "model": {}}',
    "tokenizer_config.json": b'{"bos_token": "<s>"}',
    "preprocessor_config.json": b'{"min_pixels": 147384}',
    "generation_config.json": b'{"eos_token_id": 2}',
    "chat_template.jinja": b"{{ messages }}",
    "model.safetensors": WEIGHTS,
    "README.md": b"# not needed",
    "modeling_paddleocr_vl.py": b"# remote code, never fetched",
}
WANTED = sorted(set(SNAPSHOT) - {"README.md", "modeling_paddleocr_vl.py"})


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every cache, token and endpoint in tmp_path or on loopback; nothing reaches a real hub."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "ms-home"))  # its credentials folder
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "MODELSCOPE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fakehub.dead_url())
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", fakehub.dead_url())
    monkeypatch.setattr(assets, "models_cache_dir", lambda: tmp_path / "models")
    return tmp_path


@pytest.fixture
def hub():
    server = fakehub.start(SNAPSHOT)
    yield server
    server.stop()


@pytest.fixture
def root(isolated: Path) -> Path:
    return isolated / "models" / MODEL


def use(monkeypatch: pytest.MonkeyPatch, *, hf: str | None = None, ms: str | None = None) -> None:
    """Point the hubs at `hf` / `ms`; None leaves that hub dead (a closed loopback port)."""
    monkeypatch.setenv("HF_ENDPOINT", hf or fakehub.dead_url())
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms or fakehub.dead_url())


def resolve(**kwargs) -> tuple[ModelFiles, list[str]]:
    lines: list[str] = []
    files = resolve_model_files(MODEL, ModelEntry(), progress=False, log=lines.append, **kwargs)
    return files, lines


def assert_snapshot(files: ModelFiles) -> None:
    assert files.weights.read_bytes() == WEIGHTS
    assert files.config.read_bytes() == SNAPSHOT["config.json"]
    assert files.tokenizer.read_bytes() == SNAPSHOT["tokenizer.json"]
    assert files.chat_template is not None and files.chat_template.read_bytes() == SNAPSHOT["chat_template.jinja"]
    assert files.generation_config is not None and files.preprocessor_config is not None
    assert files.tokenizer_config is not None and files.special_tokens_map is None  # not in this snapshot


def downloaded(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names_both_models_and_their_files() -> None:
    assert get_model("deepseek-ocr").repo == "deepseek-ai/DeepSeek-OCR"
    assert get_model("deepseek-ocr").weights == ("model-00001-of-000001.safetensors",)
    assert "model.safetensors.index.json" in get_model("deepseek-ocr").files
    assert get_model("paddleocr-vl").repo == "PaddlePaddle/PaddleOCR-VL"
    assert get_model("paddleocr-vl").weights == ("model.safetensors",)
    for spec in MODELS.values():
        assert spec.required[:2] == ("config.json", "tokenizer.json")
        assert {"generation_config.json", "tokenizer_config.json", "chat_template.jinja"} <= set(spec.optional)
    with pytest.raises(UnknownModelError, match="known: deepseek-ocr, paddleocr-vl"):
        get_model("llava")
    with pytest.raises(UnknownModelError):
        resolve_model_files("llava", ModelEntry())


def test_cache_dir_is_the_platform_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real function, not the fixture's stand-in
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert assets.models_cache_dir() == tmp_path / "xdg" / "deepseek-ocr" / "models"
    assert assets.models_cache_dir().parts[-2:] == ("deepseek-ocr", "models")


# ------------------------------------------------------------------------------------------------ downloads
def test_download_from_huggingface(hub, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url)
    files, lines = resolve()
    assert files.source == "huggingface" and files.directory == root
    assert_snapshot(files)
    assert downloaded(root) == WANTED  # README and remote code are not fetched
    assert any("Hugging Face" in line for line in lines) and any(str(root) in line for line in lines)


def test_download_from_modelscope(hub, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, ms=hub.url)
    files, lines = resolve()
    assert files.source == "modelscope" and files.directory == root
    assert_snapshot(files)
    assert downloaded(root) == WANTED
    assert any("ModelScope" in line for line in lines)


def test_hf_token_from_environment_is_sent(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    resolve()
    sent = [r.headers.get("authorization") for r in hub.requests if "/resolve/" in r.path]
    assert sent and all(value == "Bearer hf_secret_for_test" for value in sent)


def fixed_probe(monkeypatch: pytest.MonkeyPatch, hf: tuple[bool, float], ms: tuple[bool, float]) -> None:
    """Fix the probe's answer: timings on a shared, loaded machine are too noisy to decide an order."""
    monkeypatch.setattr(assets, "_probe", lambda endpoints, repo: {"huggingface": hf, "modelscope": ms})


def test_the_faster_hub_is_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    slow, fast = fakehub.start(SNAPSHOT, delay=1.0), fakehub.start(SNAPSHOT)
    try:
        use(monkeypatch, hf=slow.url, ms=fast.url)
        assert resolve()[0].source == "modelscope"
        assert slow.file_requests("model.safetensors") == []
    finally:
        slow.stop(), fast.stop()


def test_falls_back_when_the_first_hub_fails_mid_download(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda seconds: None)
    failing = fakehub.start(SNAPSHOT)
    failing.cut("model.safetensors", after=0, times=100)  # answers everything, then every download dies
    fixed_probe(monkeypatch, hf=(True, 0.01), ms=(True, 0.02))
    try:
        use(monkeypatch, hf=failing.url, ms=hub.url)
        files, lines = resolve()
    finally:
        failing.stop()
    assert files.source == "modelscope"
    assert_snapshot(files)
    assert any("Hugging Face failed" in line for line in lines)


def test_a_hub_without_the_repository_is_tried_last(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = fakehub.start(SNAPSHOT, repo="someone/else")  # answers 404 for our repository
    try:
        use(monkeypatch, hf=wrong.url, ms=hub.url)
        probes = assets._probe(assets._endpoints(), get_model(MODEL).repo)
        assert probes["huggingface"][0] is False and probes["modelscope"][0] is True
        fixed_probe(monkeypatch, hf=(False, 0.01), ms=(True, 0.5))
        assert resolve()[0].source == "modelscope"
        assert wrong.file_requests("model.safetensors") == []
    finally:
        wrong.stop()


def test_a_repository_without_a_required_file_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = fakehub.start({k: v for k, v in SNAPSHOT.items() if k != "tokenizer.json"})
    try:
        use(monkeypatch, hf=broken.url, ms=broken.url)
        with pytest.raises(ModelFilesError, match="has no tokenizer.json"):
            resolve()
    finally:
        broken.stop()


# ------------------------------------------------------------------------------------------------ integrity
def test_corrupt_download_from_huggingface_is_fetched_again(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url)
    hub.corrupt("model.safetensors")  # same size, wrong bytes: huggingface_hub alone would accept it
    files, _ = resolve()
    assert files.weights.read_bytes() == WEIGHTS
    assert len(hub.file_requests("model.safetensors")) == 2


def test_corrupt_download_from_modelscope_is_fetched_again(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, ms=hub.url)
    hub.corrupt("config.json")
    files, _ = resolve()
    assert files.config.read_bytes() == SNAPSHOT["config.json"]
    assert len(hub.file_requests("config.json")) >= 2


def test_corrupt_file_on_disk_is_detected_and_fetched_again(hub, root: Path, monkeypatch) -> None:
    use(monkeypatch, hf=hub.url)
    files, _ = resolve()
    stat = files.weights.stat()
    files.weights.write_bytes(bytes(len(WEIGHTS)))        # same size
    # Pin a different mtime: the kernel's coarse clock could give the rewrite the same timestamp.
    os.utime(files.weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    before = len(hub.file_requests("model.safetensors"))
    again, _ = resolve()
    assert again.weights.read_bytes() == WEIGHTS
    assert len(hub.file_requests("model.safetensors")) == before + 1


def test_verify_rehashes_even_an_untouched_looking_file(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url)
    files, _ = resolve()
    stat = files.weights.stat()
    files.weights.write_bytes(bytes(len(WEIGHTS)))
    os.utime(files.weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as recorded
    again, _ = resolve(verify=True)
    assert again.weights.read_bytes() == WEIGHTS


# ------------------------------------------------------------------------------------------------ interruptions
def test_dropped_connection_is_retried_within_a_run(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url)
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda seconds: None)
    hub.cut("model.safetensors", after=100_000)
    files, _ = resolve()
    assert files.weights.read_bytes() == WEIGHTS
    # huggingface_hub resumes at 10 MiB boundaries only, so a file this small is simply fetched again.
    assert len(hub.file_requests("model.safetensors")) == 2


def test_interrupted_huggingface_download_restarts_cleanly(hub, root: Path, monkeypatch) -> None:
    use(monkeypatch, hf=hub.url)
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda seconds: None)
    # A partial file left by a killed run (huggingface_hub never reuses these).
    orphan = root / ".cache" / "huggingface" / "download" / "model.safetensors.abc.1234abcd.incomplete"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(WEIGHTS[:5000])
    hub.cut("model.safetensors", after=0, times=100)     # every attempt of this run dies
    with pytest.raises(ModelFilesError):
        resolve()
    assert not orphan.exists()
    assert not list(root.glob("**/*.incomplete")) and not (root / "model.safetensors").exists()
    assert not (root / assets.MANIFEST).exists()
    hub._faults.clear()                                    # the network is back
    first = len(hub.file_requests("model.safetensors"))
    files, _ = resolve()
    assert files.weights.read_bytes() == WEIGHTS
    assert [r.headers.get("range") for r in hub.file_requests("model.safetensors")[first:]] == [None]


def test_interrupted_modelscope_download_resumes_across_runs(hub, root: Path, monkeypatch) -> None:
    use(monkeypatch, ms=hub.url)
    root.mkdir(parents=True)
    (root / "model.safetensors.incomplete").write_bytes(WEIGHTS[:120_000])  # what a killed run leaves
    files, _ = resolve()
    assert files.weights.read_bytes() == WEIGHTS
    assert [r.headers.get("range") for r in hub.file_requests("model.safetensors")] == ["bytes=120000-"]


# ------------------------------------------------------------------------------------------------ offline reuse
def test_verified_files_are_reused_with_zero_requests(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url)
    first, _ = resolve()
    count = hub.request_count
    again, lines = resolve()                              # hubs alive: still not asked
    assert again == first and hub.request_count == count and lines == []
    use(monkeypatch)                                      # both hubs dead
    started = time.monotonic()
    assert resolve()[0] == first
    assert time.monotonic() - started < 1.0
    use(monkeypatch, hf=hub.url, ms=hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve()[0] == first
    assert hub.request_count == count


def test_offline_without_files_says_so(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url, ms=hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesError, match="HF_HUB_OFFLINE"):
        resolve()
    assert hub.request_count == 0


def _fill_hf_cache(hf_home: Path, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache the way huggingface_hub lays it out: blobs named by hash, snapshot symlinks."""
    storage = hf_home / "hub" / "models--PaddlePaddle--PaddleOCR-VL"
    snapshot = storage / "snapshots" / fakehub.COMMIT
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(fakehub.COMMIT)
    for name, data in files.items():
        lfs = name.endswith(fakehub.LFS_SUFFIXES)
        blob = storage / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else fakehub.git_blob_sha1(data))
        blob.write_bytes(data)
        try:
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
        except OSError:
            pytest.skip("symlinks are not available here")
    return storage


def test_existing_huggingface_cache_is_reused_offline(isolated: Path) -> None:
    _fill_hf_cache(isolated / "hf-home", {k: v for k, v in SNAPSHOT.items() if k in WANTED})
    files, lines = resolve()                              # both hubs dead
    assert files.source == "huggingface"
    assert files.directory.name == fakehub.COMMIT
    assert_snapshot(files)
    assert any("Hugging Face cache" in line for line in lines)


def test_tampered_huggingface_cache_is_not_trusted(isolated: Path) -> None:
    storage = _fill_hf_cache(isolated / "hf-home", {k: v for k, v in SNAPSHOT.items() if k in WANTED})
    blob = storage / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()
    blob.write_bytes(bytes(len(WEIGHTS)))
    with pytest.raises(ModelFilesError, match="could not be downloaded") as caught:
        resolve()
    # The way out names the hub environment variables and the local-file flags.
    for name in ("HF_ENDPOINT", "MODELSCOPE_ENDPOINT", "HF_HUB_OFFLINE", "--model-dir", "--model-config"):
        assert name in str(caught.value), name


def test_offline_error_names_the_mirror_variables(hub, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url, ms=hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFilesError, match="HF_ENDPOINT / MODELSCOPE_ENDPOINT") as caught:
        resolve()
    assert "--model-dir" in str(caught.value)


def test_local_file_errors_are_spelled_for_the_caller(tmp_path: Path) -> None:
    from common.config import keyword_spelling

    entry = ModelEntry(model_dir=tmp_path / "nowhere", spell=keyword_spelling)
    with pytest.raises(ModelFilesError, match=r"model folder not found: .*nowhere \(model_dir\)$"):
        resolve_model_files(MODEL, entry)
    folder = _local_snapshot(tmp_path / "snap")
    (folder / "config.json").unlink()
    with pytest.raises(ModelFilesError, match=r"\(set model_config or model_dir\)$"):
        resolve_model_files(MODEL, ModelEntry(model_dir=folder, spell=keyword_spelling))
    with pytest.raises(ModelFilesError, match=r"\(set --model-config or --model-dir\)$"):
        resolve_model_files(MODEL, ModelEntry(model_dir=folder))


# ------------------------------------------------------------------------------------------------ failures
def test_all_hubs_dead_fails_fast_with_one_clear_message(root: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ModelFilesError) as caught:
        resolve()
    assert time.monotonic() - started < 5.0
    message = str(caught.value)
    assert "\n" not in message and str(root) in message
    for needle in ("Hugging Face", "ModelScope", "--model-dir", "--weights", "--tokenizer", "--model-config"):
        assert needle in message


@pytest.mark.slow
def test_a_hub_that_never_answers_is_given_up_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as silent:                       # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        use(monkeypatch, hf=url, ms=url)
        started = time.monotonic()
        with pytest.raises(ModelFilesError, match="ModelScope"):
            resolve()
        assert time.monotonic() - started < assets.PROBE_TIMEOUT_S + 3.0


# ------------------------------------------------------------------------------------------------ local paths
def _local_snapshot(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in WANTED:
        (folder / name).write_bytes(SNAPSHOT[name])
    return folder


def test_model_dir_bypasses_downloads(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, hf=hub.url, ms=hub.url)
    folder = _local_snapshot(tmp_path / "snap")
    files = resolve_model_files(MODEL, ModelEntry(model_dir=folder), log=pytest.fail)
    assert files.source == "local" and files.directory == folder
    assert_snapshot(files)
    assert hub.request_count == 0


def test_single_paths_find_side_files_beside_them(hub, tmp_path: Path, monkeypatch) -> None:
    use(monkeypatch, hf=hub.url, ms=hub.url)
    folder = _local_snapshot(tmp_path / "snap")
    weights = tmp_path / "elsewhere" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(WEIGHTS)
    files = resolve_model_files(MODEL, ModelEntry(config=folder / "config.json", weights=weights,
                                                  tokenizer=folder / "tokenizer.json"))
    assert files.weights == weights and files.config == folder / "config.json"
    assert files.generation_config == folder / "generation_config.json"
    assert files.tokenizer_config == folder / "tokenizer_config.json"
    files = resolve_model_files(MODEL, ModelEntry(weights=folder / "model.safetensors"))  # the rest beside it
    assert files.tokenizer == folder / "tokenizer.json" and files.chat_template == folder / "chat_template.jinja"
    assert hub.request_count == 0


def test_missing_local_file_is_named(tmp_path: Path) -> None:
    folder = _local_snapshot(tmp_path / "snap")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match=r"tokenizer file not found: .*tokenizer\.json"):
        resolve_model_files(MODEL, ModelEntry(model_dir=folder))
    with pytest.raises(ModelFilesError, match="model folder not found"):
        resolve_model_files(MODEL, ModelEntry(model_dir=tmp_path / "nowhere"))
    (folder / "tokenizer.json").write_bytes(SNAPSHOT["tokenizer.json"])
    with pytest.raises(ModelFilesError, match=r"weights file not found: .*nope\.safetensors"):
        resolve_model_files(MODEL, ModelEntry(model_dir=folder, weights=tmp_path / "nope.safetensors"))


# ------------------------------------------------------------------------------------------------ real layout
@pytest.mark.slow
def test_tiny_deepseek_snapshot_round_trips_through_the_hub(deepseek_tiny: Path, monkeypatch) -> None:
    """The registry's DeepSeek-OCR names against a snapshot in the real layout (tiny random weights)."""
    files_on_hub = {p.name: p.read_bytes() for p in deepseek_tiny.iterdir() if p.is_file() and p.name[0] != "."}
    server = fakehub.start(files_on_hub, repo="deepseek-ai/DeepSeek-OCR")
    try:
        use(monkeypatch, hf=server.url)
        files = resolve_model_files("deepseek-ocr", ModelEntry(), progress=False, log=lambda line: None)
    finally:
        server.stop()
    assert files.weights.name == "model-00001-of-000001.safetensors"
    assert (files.directory / "model.safetensors.index.json").is_file()
    for path in (files.config, files.tokenizer, files.weights, files.tokenizer_config, files.generation_config,
                 files.special_tokens_map):
        assert path is not None and path.read_bytes() == (deepseek_tiny / path.name).read_bytes()
    assert files.chat_template is None and files.preprocessor_config is None


def test_fakehub_environment_isolates_a_subprocess(hub, tmp_path: Path) -> None:
    import subprocess

    env = {**os.environ, **fakehub.environment(tmp_path, hub)}
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    code = ("from common.assets import resolve_model_files, models_cache_dir; from common.config import ModelEntry;"
            "f = resolve_model_files('paddleocr-vl', ModelEntry(), progress=False); print(f.source, f.directory)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    source, directory = out.stdout.split()
    assert source in ("huggingface", "modelscope")
    if sys.platform.startswith("linux"):
        assert Path(directory) == tmp_path / "xdg-cache" / "deepseek-ocr" / "models" / "paddleocr-vl"
    assert hub.file_requests("model.safetensors")
