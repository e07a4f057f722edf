"""Model id -> the files on disk: local paths, a verified download cache, or a fresh Hugging Face / ModelScope download.

Where files come from, in order:
1. Paths the user gave (`model_dir`, or `config` / `tokenizer` / `weights`): used as they are, no network.
2. Our cache, `<user cache dir>/models/<id>/` (e.g. ~/.cache/deepseek-ocr/models/deepseek-ocr/), when its
   manifest (`.verified.json`) says every file was checked and the files still have the recorded size and
   mtime: no network at all. A file whose mtime changed is hashed again; a mismatch means "fetch it again".
3. A complete snapshot already in the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub), checked against the
   content hashes its blob names are: reused in place, no network.
4. A download with the libraries' own `snapshot_download` into our cache folder (`local_dir=`), from whichever
   hub answers a short probe first, falling back to the other when it fails.

Gaps of the libraries this module closes (see the interface notes):
- huggingface_hub checks only sizes: every file is checked against the hub's sha256 (LFS files) or git blob
  id (small files) from the tree listing, and a bad file is fetched once more with `force_download`.
- huggingface_hub does not resume across runs: an interrupted download RESTARTS cleanly (partial files it
  leaves behind are deleted before the next attempt; within one run it resumes a dropped connection itself).
  ModelScope resumes across runs from its `<file>.incomplete`.
- ModelScope fails on a dead endpoint even with a full cache: a verified cache never reaches a library at all.
- HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and the token are read at call time (the library reads them at import).
  HF_HUB_OFFLINE set means no network for either hub: verified files or a clear error.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import platformdirs

from .config import APP, ModelEntry
from .errors import ModelFilesError
from .registry import ModelSpec, get_model

Source = Literal["local", "huggingface", "modelscope"]
MANIFEST = ".verified.json"
PROBE_TIMEOUT_S = 2.0
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MS_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
#: The environment variables that choose the hubs or keep them off, named in every "cannot download" error.
_HUB_ENV = ("HF_ENDPOINT or MODELSCOPE_ENDPOINT to use a mirror, HF_HUB_OFFLINE=1 to use cached files only")
_NAMES = {"huggingface": "Hugging Face", "modelscope": "ModelScope"}


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelFiles:
    """Every file a run of one model reads; the optional ones are None when the snapshot has none."""

    model_id: str
    directory: Path
    config: Path
    tokenizer: Path
    weights: Path                       # the first (for both models: the only) safetensors shard
    tokenizer_config: Path | None
    preprocessor_config: Path | None
    generation_config: Path | None
    chat_template: Path | None
    source: Source
    special_tokens_map: Path | None = None


def models_cache_dir() -> Path:
    """Where downloaded snapshots live: `<user cache dir>/models`, read at call time (tests move it)."""
    return Path(platformdirs.user_cache_dir(APP, appauthor=False, opinion=False)) / "models"


def resolve_model_files(
    model_id: str,
    entry: ModelEntry,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print_to_stderr,
    verify: bool = False,
) -> ModelFiles:
    """The files of `model_id`, from `entry`'s local paths, the verified cache, or a download (module docstring).

    `verify` hashes every cached file again instead of trusting unchanged size and mtime.
    Raises `UnknownModelError` for an unknown id and `ModelFilesError` when files are missing, corrupt or
    cannot be downloaded (the message names the file or both hubs, the hub environment variables, and the
    settings that point at local files, spelled by `entry.spell`).
    """
    spec = get_model(model_id)
    if entry.is_local:
        return _resolve_local(spec, entry)
    local = _local_settings(entry.spell)
    root = models_cache_dir() / spec.model_id
    manifest, stale = _check_manifest(root, spec, rehash=verify)
    if manifest is not None:
        return _model_files(spec, Path(manifest["directory"]), manifest)
    manifest = _reuse_hf_cache(spec, root, log)
    if manifest is not None:
        log(f"{spec.model_id}: using the Hugging Face cache at {manifest['directory']}")
        return _model_files(spec, Path(manifest["directory"]), manifest)
    if _hf_offline():
        missing = ", ".join(stale) or "all"
        raise ModelFilesError(
            f"{spec.model_id}: files missing or changed in {root} ({missing}) and HF_HUB_OFFLINE is set; "
            f"unset it to download (or set HF_ENDPOINT / MODELSCOPE_ENDPOINT for a mirror), or point at local "
            f"files with {local}"
        )
    return _download(spec, root, progress=progress, log=log, local=local)


# ------------------------------------------------------------------------------------------------ local paths
def _local_settings(spell: Callable[..., str]) -> str:
    return f"{spell('model_dir')}, or {spell('weights')}, {spell('tokenizer')} and {spell('model_config')}"


def _other_weights(directory: Path) -> Path | None:
    """A folder's weights under another name than the hub's (a converted snapshot's `model.safetensors`, a
    re-sharded copy): its safetensors index, else its only safetensors file."""
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
        return index[0]
    files = sorted(directory.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def _resolve_local(spec: ModelSpec, entry: ModelEntry) -> ModelFiles:
    """Files from the user's paths; side files are looked up next to the tokenizer, the config and the weights."""
    spell = entry.spell
    if entry.model_dir is not None and not entry.model_dir.is_dir():
        raise ModelFilesError(f"{spec.model_id}: model folder not found: {entry.model_dir} ({spell('model_dir')})")
    given = [p for p in (entry.model_dir, entry.weights, entry.config, entry.tokenizer) if p is not None]
    directory = entry.model_dir or given[0].parent
    paths = {}
    for key, name, flag in (("config", spec.config, "model_config"), ("tokenizer", spec.tokenizer, "tokenizer"),
                            ("weights", spec.weights[0], "weights")):
        path = getattr(entry, key) or directory / name
        if key == "weights" and entry.weights is None and not path.is_file():
            path = _other_weights(directory) or path
        if not path.is_file():
            raise ModelFilesError(f"{spec.model_id}: {key} file not found: {path} "
                                  f"(set {spell(flag)} or {spell('model_dir')})")
        paths[key] = path
    folders = list(dict.fromkeys((paths["tokenizer"].parent, paths["config"].parent, directory,
                                  paths["weights"].parent)))

    def beside(name: str, first: Path) -> Path | None:
        for folder in dict.fromkeys((first, *folders)):
            if (folder / name).is_file():
                return folder / name
        return None

    return ModelFiles(
        model_id=spec.model_id,
        directory=directory,
        config=paths["config"],
        tokenizer=paths["tokenizer"],
        weights=paths["weights"],
        tokenizer_config=beside("tokenizer_config.json", paths["tokenizer"].parent),
        preprocessor_config=beside("preprocessor_config.json", paths["config"].parent),
        generation_config=beside("generation_config.json", paths["config"].parent),
        chat_template=beside("chat_template.jinja", paths["config"].parent),
        source="local",
        special_tokens_map=beside("special_tokens_map.json", paths["tokenizer"].parent),
    )


def _model_files(spec: ModelSpec, directory: Path, manifest: dict[str, Any]) -> ModelFiles:
    present = manifest["files"]

    def optional(name: str) -> Path | None:
        return directory / name if name in present else None

    return ModelFiles(
        model_id=spec.model_id,
        directory=directory,
        config=directory / spec.config,
        tokenizer=directory / spec.tokenizer,
        weights=directory / spec.weights[0],
        tokenizer_config=optional("tokenizer_config.json"),
        preprocessor_config=optional("preprocessor_config.json"),
        generation_config=optional("generation_config.json"),
        chat_template=optional("chat_template.jinja"),
        source=manifest["source"],
        special_tokens_map=optional("special_tokens_map.json"),
    )


# ------------------------------------------------------------------------------------------------ hashing, manifest
def _hashes(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one read: hubs name LFS files by the first, small files by the second."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    sha1.update(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            sha256.update(block)
            sha1.update(block)
    return sha256.hexdigest(), sha1.hexdigest()


def _matches(path: Path, expected: str | None) -> tuple[bool, str]:
    """Whether `path` has content hash `expected` (64 hex: sha256, 40 hex: git blob id); also its sha256."""
    sha256, sha1 = _hashes(path)
    return expected is None or expected.lower() in (sha256, sha1), sha256


def _record(path: Path, sha256: str) -> dict[str, Any]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def _check_manifest(root: Path, spec: ModelSpec, rehash: bool) -> tuple[dict[str, Any] | None, list[str]]:
    """(the manifest, []) when every recorded file is intact; (None, names of missing or changed files) otherwise."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        directory, files = Path(manifest["directory"]), manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, []
    stale = [name for name in spec.required if name not in files]
    changed = False
    for name, record in files.items():
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            stale.append(name)
            continue
        if stat.st_size != record["size"]:
            stale.append(name)
        elif rehash or stat.st_mtime_ns != record["mtime_ns"]:
            # Touched since it was checked: trust the bytes only if they still hash the same.
            ok, _ = _matches(path, record["sha256"])
            if not ok:
                stale.append(name)
                if directory == root:
                    path.unlink()  # corrupt, in our own cache: make sure the next download replaces it
            elif stat.st_mtime_ns != record["mtime_ns"]:
                record["mtime_ns"], changed = stat.st_mtime_ns, True
    if stale:
        return None, stale
    if changed:
        _write_manifest(root, manifest)
    return manifest, []


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
    os.replace(tmp, root / MANIFEST)  # atomic: a reader sees the old manifest or the new one


def _previous_records(root: Path) -> dict[str, dict[str, Any]]:
    """Records of files checked in an earlier run (to skip hashing them again), or {}."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        return manifest["files"] if Path(manifest["directory"]) == root else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ------------------------------------------------------------------------------------------------ environment
def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_offline() -> bool:
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def _hf_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.environ.get("HF_HOME") or default).expanduser()


def _hf_token() -> str | bool:
    """HF_TOKEN, else the token file under HF_HOME; False (send none) rather than the import-time location."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("HF_TOKEN_PATH") or _hf_home() / "token").expanduser()
    try:
        return path.read_text(encoding="utf-8").strip() or False
    except OSError:
        return False


def _endpoints() -> dict[str, str]:
    return {
        "huggingface": (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/"),
        "modelscope": (os.environ.get("MODELSCOPE_ENDPOINT") or MS_DEFAULT_ENDPOINT).rstrip("/"),
    }


# ------------------------------------------------------------------------------------------------ Hugging Face cache
def _reuse_hf_cache(spec: ModelSpec, root: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """A manifest for a complete, hash-checked snapshot of `spec` in the Hugging Face cache, or None.

    The cache names each blob by its content hash (sha256 for LFS files, git blob id otherwise), so the check
    needs no network. Copies without symlinks (some Windows setups) carry no hash and are not reused.
    """
    cache = Path(os.environ.get("HF_HUB_CACHE") or _hf_home() / "hub").expanduser()
    storage = cache / f"models--{spec.repo.replace('/', '--')}"
    try:
        commit = (storage / "refs" / "main").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    snapshot = storage / "snapshots" / commit
    if not all((snapshot / name).is_file() for name in spec.required):
        return None
    log(f"{spec.model_id}: checking the files in the Hugging Face cache at {snapshot}")
    files = {}
    for name in spec.files:
        path = snapshot / name
        if not path.is_file():
            continue
        if not path.is_symlink():
            return None
        ok, sha256 = _matches(path, path.resolve().name)
        if not ok:
            return None
        files[name] = _record(path, sha256)
    manifest = {"directory": str(snapshot), "source": "huggingface", "repo": spec.repo, "revision": commit,
                "files": files}
    _write_manifest(root, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ downloads
def _probe(endpoints: dict[str, str], repo: str) -> dict[str, tuple[bool, float] | str]:
    """Per source, probed in parallel: (answered 2xx/3xx, seconds) for any answer below 500, else why not.

    The probe asks for the repository itself (a small JSON answer), so "404" already tells a hub without it.
    """
    import httpx

    urls = {
        "huggingface": f"{endpoints['huggingface']}/api/models/{repo}/revision/main",
        "modelscope": f"{endpoints['modelscope']}/api/v1/models/{repo}/repo/files?Revision=master&Recursive=True",
    }

    def probe(url: str) -> tuple[bool, float] | str:
        started = time.monotonic()
        try:
            with httpx.Client(timeout=PROBE_TIMEOUT_S, follow_redirects=True) as client:
                status = client.get(url).status_code
        except httpx.TimeoutException:
            return f"no answer within {PROBE_TIMEOUT_S:g} s"
        except httpx.ConnectError:
            return "cannot connect"
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            return _short(error)
        return (status < 400, time.monotonic() - started) if status < 500 else f"HTTP {status}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {source: pool.submit(probe, url) for source, url in urls.items()}
        return {source: future.result() for source, future in futures.items()}


def _download(spec: ModelSpec, root: Path, *, progress: bool, log: Callable[[str], None],
              local: str) -> ModelFiles:
    """Download into `root` from the faster live hub, falling back to the other; verify; write the manifest."""
    endpoints = _endpoints()
    probes = _probe(endpoints, spec.repo)
    # A hub that answered "not found / not allowed" (a gated or missing repo) is tried after one that did not.
    alive = sorted((s for s, r in probes.items() if isinstance(r, tuple)), key=lambda s: (not probes[s][0], probes[s][1]))
    failures = {s: str(r) for s, r in probes.items() if isinstance(r, str)}
    for source in alive:
        log(f"{spec.model_id}: downloading {spec.repo} from {_NAMES[source]} ({endpoints[source]}, "
            f"answered in {probes[source][1] * 1000:.0f} ms)")
        log(f"{spec.model_id}: files go to {root}")
        try:
            fetch = _download_hf if source == "huggingface" else _download_ms
            manifest = fetch(spec, root, endpoints[source], progress)
        except (TypeError, AttributeError, NameError, ImportError):
            raise  # our bugs, not the hub's
        except Exception as error:  # any hub, network or disk failure: try the other hub
            failures[source] = _short(error)
            log(f"{spec.model_id}: {_NAMES[source]} failed: {failures[source]}")
            continue
        _write_manifest(root, manifest)
        return _model_files(spec, root, manifest)
    reasons = "; ".join(f"{_NAMES[s]} ({endpoints[s]}): {failures[s]}" for s in ("huggingface", "modelscope"))
    raise ModelFilesError(
        f"{spec.model_id}: model files are not in {root} and could not be downloaded from either hub "
        f"[{reasons}]; set {_HUB_ENV}, or download {spec.repo} elsewhere and point at it with {local}"
    )


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _wanted(spec: ModelSpec, listing: dict[str, str | None], hub: str) -> list[str]:
    """The registry's files that the repository has; a missing required file is the repository's fault."""
    missing = [name for name in spec.required if name not in listing]
    if missing:
        raise ModelFilesError(f"{spec.repo} on {hub} has no {', '.join(missing)}")
    return [name for name in spec.files if name in listing]


def _verify(root: Path, names: list[str], listing: dict[str, str | None], refetch: Callable[[str], None],
            hub: str) -> dict[str, dict[str, Any]]:
    """Check each file against the hub's hash, fetching a bad one once more; return the manifest records."""
    previous = _previous_records(root)
    records = {}
    for name in names:
        path = root / name
        record = previous.get(name)
        if record is not None and path.is_file() and path.stat().st_size == record["size"] \
                and path.stat().st_mtime_ns == record["mtime_ns"] and listing[name] in (record["sha256"], None):
            records[name] = record      # checked in an earlier run and untouched since
            continue
        ok, sha256 = _matches(path, listing[name]) if path.is_file() else (False, "")
        if not ok:
            path.unlink(missing_ok=True)
            refetch(name)
            ok, sha256 = _matches(path, listing[name])
            if not ok:
                raise ModelFilesError(f"{name} from {hub} fails its hash check twice (corrupt on the hub?)")
        records[name] = _record(path, sha256)
    return records


def _download_hf(spec: ModelSpec, root: Path, endpoint: str, progress: bool) -> dict[str, Any]:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    token = _hf_token()
    api = HfApi(endpoint=endpoint, token=token)
    commit = api.repo_info(spec.repo, revision="main").sha
    listing = {
        entry.path: entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
        for entry in api.list_repo_tree(spec.repo, revision=commit, recursive=True)
        if isinstance(entry, RepoFile)
    }
    names = _wanted(spec, listing, "Hugging Face")
    # Partial files of a killed run are never resumed by huggingface_hub: delete them so the retry starts clean.
    for partial in (root / ".cache" / "huggingface").glob("**/*.incomplete"):
        partial.unlink(missing_ok=True)
    common = {"endpoint": endpoint, "token": token, "local_dir": root, "revision": commit}
    quiet = {} if progress else {"tqdm_class": _silent_tqdm()}
    snapshot_download(spec.repo, allow_patterns=names, **common, **quiet)
    records = _verify(
        root, names, listing,
        lambda name: hf_hub_download(spec.repo, name, force_download=True, **common, **quiet),
        "Hugging Face",
    )
    return {"directory": str(root), "source": "huggingface", "repo": spec.repo, "revision": commit,
            "files": records}


def _download_ms(spec: ModelSpec, root: Path, endpoint: str, progress: bool) -> dict[str, Any]:
    # The download client modelscope itself delegates to: importing it takes 0.2 s, `import modelscope` seconds.
    # It draws its own tqdm bars (TQDM_DISABLE=1 silences them); `progress` has no switch there.
    from modelscope_hub.api import HubApi
    from modelscope_hub.compat import snapshot_download

    token = os.environ.get("MODELSCOPE_API_TOKEN") or None
    listing = {
        entry.path: entry.sha256
        for entry in HubApi(endpoint=endpoint, token=token).list_repo_files(spec.repo, "model", revision="master")
    }
    names = _wanted(spec, listing, "ModelScope")
    common = {"endpoint": endpoint, "token": token, "local_dir": str(root)}
    snapshot_download(spec.repo, allow_patterns=names, **common)
    records = _verify(
        root, names, listing,
        lambda name: snapshot_download(spec.repo, allow_patterns=[name], **common),
        "ModelScope",
    )
    return {"directory": str(root), "source": "modelscope", "repo": spec.repo, "revision": "master",
            "files": records}


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class Silent(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
