"""Named checkpoints and GLUE catalog fallback: downloaded once, checked, never half-cached.

A Google-style release zip (a real TF checkpoint written by bert_mini) is served from a local
``http.server`` thread, so every test runs without internet; the TFDS catalog download is made to
fail (or is fed local files) by pointing it at a closed port or patching its download functions.
"""

import hashlib
import http.server
import io
import pathlib
import socket
import threading
import zipfile

import numpy as np
import pytest
from flax import nnx

from bert_mini import checkpoint_formats, config_lib, downloads
from bert_mini.checkpoints import from_pretrained
from bert_mini.downloads import ChecksumError, DownloadError, resolve_checkpoint
from bert_mini.model import BertConfig, create_model

TINY = "uncased_L-2_H-128_A-2"
TINY_KEY = f"2020_02_20/{TINY}.zip"


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch):
    """Tests choose the cache, mirror and offline switch themselves."""
    for name in ("BERT_MINI_OFFLINE", "BERT_MINI_RELEASE_URL", "BERT_MINI_CACHE"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- a local server


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.drop:  # announce the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server:
    """Serves ``files`` (URL path -> bytes) on localhost; ``drop`` paths are cut mid-file."""

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.files, self.httpd.drop, self.httpd.requests = {}, set(), []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bert_models"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def serve(self, key: str, body: bytes, drop: bool = False) -> None:
        path = f"/bert_models/{key}"
        self.httpd.files[path] = body
        (self.httpd.drop.add if drop else self.httpd.drop.discard)(path)

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.running = False


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.stop()


def _closed_port_url() -> str:
    """A URL nothing listens on: connecting fails at once, like a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/bert_models"


# ----------------------------------------------------------------------------- release zips


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory, vocab_path) -> tuple[bytes, dict[str, np.ndarray]]:
    """A 2020-style release zip (files at the top) holding a real tiny TF checkpoint."""
    folder = tmp_path_factory.mktemp("release")
    config = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=64,
        hidden_act="gelu_tanh",
    )
    model = create_model(config, None, seed=3)
    checkpoint_formats.write_tf(model, folder)
    (folder / "checkpoint").unlink()  # Google's zips hold no TF state file
    vocab = vocab_path.read_text(encoding="utf-8").splitlines()[:1000]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    body = _zip({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    return body, _params(model)


def _cached(cache: pathlib.Path, folder: str = TINY, date: str = "2020_02_20"):
    return (
        cache / "bert_models" / date / folder,
        cache / "downloads" / date / f"{folder}.zip",
        cache / "checksums.tsv",
    )


def _files(root: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- names


def test_names_cover_the_24_compact_models_and_base_large():
    base = "https://storage.googleapis.com/bert_models"
    urls = set()
    for layers in config_lib.LAYER_CHOICES:
        for hidden in config_lib.HIDDEN_CHOICES:
            folder = f"uncased_L-{layers}_H-{hidden}_A-{hidden // 64}"
            expected = f"{base}/2020_02_20/{folder}.zip"
            for name in (folder, f"google:L-{layers}_H-{hidden}", f"google:{folder}"):
                assert downloads.google_release_url(name) == expected, name
            urls.add(expected)
    assert len(urls) == 24
    mini = f"{base}/2020_02_20/uncased_L-4_H-256_A-4.zip"  # as listed in google-research/bert
    assert downloads.google_release_url("google:mini") == mini
    assert downloads.google_release_url("google:bert-mini") == mini
    assert downloads.google_release_url("google:tiny").endswith(
        "2020_02_20/uncased_L-2_H-128_A-2.zip"
    )
    original_base = f"{base}/2018_10_18/uncased_L-12_H-768_A-12.zip"
    original_large = f"{base}/2018_10_18/uncased_L-24_H-1024_A-16.zip"
    for name in ("bert-base-uncased", "google:base", "GOOGLE:Base"):
        assert downloads.google_release_url(name) == original_base
    for name in (
        "bert-large-uncased",
        "google:large",
        "google:L-24_H-1024",
        "uncased_L-24_H-1024_A-16",
    ):
        assert downloads.google_release_url(name) == original_large
    assert downloads.google_release_url("google:mini", "http://mirror/x/") == (
        "http://mirror/x/2020_02_20/uncased_L-4_H-256_A-4.zip"
    )


@pytest.mark.parametrize(
    "name",
    [
        "google:L-3_H-128",  # not in the grid
        "uncased_L-4_H-256_A-8",  # wrong head count
        "cased_L-12_H-768_A-12",  # cased models are not part of the compact release
        "google:cased_L-12_H-768_A-12",
        "google:huge",
        "bert-tiny",
        "mini",  # sizes need the google: prefix, so a typo'd local folder is never fetched
    ],
)
def test_unknown_names_list_the_scheme(name):
    with pytest.raises(ValueError, match=r"unknown checkpoint name .*names are uncased_L-<L>"):
        downloads.google_release_url(name)


def test_local_paths_are_returned_untouched(tmp_path, minilm_dir):
    folder = tmp_path / "my_ckpt"
    folder.mkdir()
    cache = tmp_path / "cache"
    assert resolve_checkpoint(folder, cache) == folder
    assert resolve_checkpoint(str(folder), cache) == folder
    assert resolve_checkpoint(minilm_dir, cache) == minilm_dir
    named_like_a_release = tmp_path / TINY  # an existing path wins over the release name
    named_like_a_release.mkdir()
    assert resolve_checkpoint(named_like_a_release, cache) == named_like_a_release
    with pytest.raises(FileNotFoundError, match=r"no_such_dir is neither an existing path"):
        resolve_checkpoint(tmp_path / "no_such_dir", cache)
    assert not cache.exists()


# ----------------------------------------------------------------------------- downloads


def test_download_extract_load_then_reuse_without_network(
    tmp_path, server, tiny_release, monkeypatch
):
    body, params = tiny_release
    server.serve(TINY_KEY, body)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BERT_MINI_CACHE", str(cache))
    monkeypatch.setenv("BERT_MINI_RELEASE_URL", server.url)
    folder = resolve_checkpoint(TINY)
    target, zip_path, checksums = _cached(cache)
    assert folder == target and server.requests == [f"/bert_models/{TINY_KEY}"]
    assert checksums.read_text() == f"{TINY_KEY}\t{len(body)}\t{hashlib.sha256(body).hexdigest()}\n"
    assert zip_path.read_bytes() == body
    model, tokenizer = from_pretrained(folder)
    assert tokenizer.vocab_size == 1000 and model.config.num_hidden_layers == 2
    loaded = _params(model)
    assert loaded.keys() == params.keys()
    for name in params:
        np.testing.assert_array_equal(loaded[name], params[name], err_msg=name)

    server.stop()
    assert resolve_checkpoint("google:tiny") == folder  # cached: no network needed
    assert resolve_checkpoint("google:L-2_H-128", cache) == folder
    (folder / "vocab.txt").unlink()  # a damaged folder is restored from the cached zip
    assert resolve_checkpoint(TINY) == folder
    assert (folder / "vocab.txt").is_file() and len(server.requests) == 1
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_corrupt_zip_or_tampered_record_is_an_error_and_keeps_the_good_cache(
    tmp_path, server, tiny_release
):
    body, _ = tiny_release
    server.serve(TINY_KEY, body)
    cache = tmp_path / "cache"
    folder = resolve_checkpoint(TINY, cache, base_url=server.url)
    target, zip_path, checksums = _cached(cache)
    good_files = {name: (folder / name).read_bytes() for name in _files(folder)}

    zip_path.write_bytes(body[:100] + bytes([body[100] ^ 1]) + body[101:])
    with pytest.raises(ChecksumError) as error:
        resolve_checkpoint(TINY, cache, base_url=server.url, refresh=True)
    message = str(error.value)
    assert "\n" not in message and str(zip_path) in message and str(checksums) in message
    assert {name: (folder / name).read_bytes() for name in _files(folder)} == good_files
    assert resolve_checkpoint(TINY, cache) == folder  # the good folder is still in use

    zip_path.write_bytes(body)
    record = checksums.read_text()
    checksums.write_text(record.replace(hashlib.sha256(body).hexdigest(), "0" * 64))
    with pytest.raises(ChecksumError, match=rf"records {TINY_KEY} as size \d+ sha256 0{{64}}"):
        resolve_checkpoint(TINY, cache, base_url=server.url, refresh=True)
    assert {name: (folder / name).read_bytes() for name in _files(folder)} == good_files

    zip_path.unlink()  # a fresh download is held to the (tampered) record too
    with pytest.raises(ChecksumError, match=r"download of http://127\.0\.0\.1.*nothing was cached"):
        resolve_checkpoint(TINY, cache, base_url=server.url, refresh=True)
    assert not zip_path.exists() and not [p for p in zip_path.parent.iterdir()]
    assert {name: (folder / name).read_bytes() for name in _files(folder)} == good_files
    checksums.write_text(record)
    assert resolve_checkpoint(TINY, cache, base_url=server.url, refresh=True) == folder
    assert zip_path.read_bytes() == body


def test_interrupted_download_leaves_no_cache_entry(tmp_path, server, tiny_release):
    body, _ = tiny_release
    server.serve(TINY_KEY, body, drop=True)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=rf"connection closed after {len(body) // 2} of"):
        resolve_checkpoint(TINY, cache, base_url=server.url)
    assert _files(cache) == []  # no zip, no partial file, no checksum record
    target, _, _ = _cached(cache)
    assert not target.exists()
    server.serve(TINY_KEY, body)
    assert resolve_checkpoint(TINY, cache, base_url=server.url) == target


def test_failed_extraction_leaves_no_folder(tmp_path, server, tiny_release, monkeypatch):
    body, _ = tiny_release
    server.serve(TINY_KEY, body)
    cache = tmp_path / "cache"

    def crash(root):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the files are out, before the rename

    monkeypatch.setattr(downloads, "_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_checkpoint(TINY, cache, base_url=server.url)
    target, zip_path, _ = _cached(cache)
    assert not target.exists() and not list(target.parent.iterdir())
    monkeypatch.undo()
    server.stop()
    assert resolve_checkpoint(TINY, cache) == target  # extracted from the verified cached zip
    assert (target / "bert_config.json").is_file() and zip_path.is_file()


def test_unreachable_url_says_which_file_to_place_where(tmp_path, server, monkeypatch):
    cache = tmp_path / "cache"
    url = _closed_port_url()
    with pytest.raises(DownloadError) as error:
        resolve_checkpoint("google:mini", cache, base_url=url)
    message = str(error.value)
    target, zip_path, _ = _cached(cache, "uncased_L-4_H-256_A-4")
    assert "\n" not in message
    assert f"could not download {url}/2020_02_20/uncased_L-4_H-256_A-4.zip (" in message
    assert (
        f"put it at {zip_path}, or unzip it so that {target / 'bert_config.json'} exists" in message
    )
    assert _files(cache) == []

    monkeypatch.setenv("BERT_MINI_OFFLINE", "1")
    with pytest.raises(DownloadError, match=r"\(BERT_MINI_OFFLINE is set\).*put it at"):
        resolve_checkpoint("google:mini", cache, base_url=server.url)
    assert server.requests == []


def test_hand_placed_zip_and_folder_are_used_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("BERT_MINI_OFFLINE", "1")
    cache = tmp_path / "cache"
    files = {"bert_config.json": b"{}", "vocab.txt": b"[PAD]\n", "bert_model.ckpt.index": b"x"}
    body = _zip({f"uncased_L-12_H-768_A-12/{name}": data for name, data in files.items()})
    target, zip_path, checksums = _cached(cache, "uncased_L-12_H-768_A-12", "2018_10_18")
    zip_path.parent.mkdir(parents=True)
    zip_path.write_bytes(body)  # a 2018-style zip: one top folder
    assert resolve_checkpoint("bert-base-uncased", cache) == target
    assert {name: (target / name).read_bytes() for name in files} == files
    assert checksums.read_text().split("\t")[2].strip() == hashlib.sha256(body).hexdigest()

    grid_target, _, _ = _cached(cache, "uncased_L-12_H-768_A-12")  # the 2020 re-trained Base
    grid_target.mkdir(parents=True)
    (grid_target / "bert_config.json").write_text("{}")  # unzipped by hand: no file list
    assert resolve_checkpoint("uncased_L-12_H-768_A-12", cache) == grid_target
    assert resolve_checkpoint("google:L-12_H-768", cache) == grid_target


def test_zip_without_bert_config_is_rejected(tmp_path, server):
    server.serve(TINY_KEY, _zip({"a/b/vocab.txt": b"x", "README": b"y"}))
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=r"no bert_config\.json .*not a Google BERT release"):
        resolve_checkpoint(TINY, cache, base_url=server.url)
    target, _, _ = _cached(cache)
    assert not target.exists() and not list(target.parent.iterdir())


# ----------------------------------------------------------------------------- GLUE fallback


def _glue_config(name: str):
    import tensorflow_datasets as tfds

    return tfds.builder_cls("glue").builder_configs[name]


def test_glue_fallback_offline_names_the_tsv_to_place(tmp_path, monkeypatch):
    from bert_mini.data.glue import load_glue
    from bert_mini.data.sources import DataError

    source, tfds_dir = tmp_path / "glue", tmp_path / "tfds"
    url = f"{_closed_port_url()}/MNLI.zip"
    monkeypatch.setattr(_glue_config("mnli"), "data_url", url)
    with pytest.raises(DataError) as error:
        load_glue("mnli", "train", source_dir=source, tfds_dir=tfds_dir)
    message = str(error.value)
    assert "\n" not in message and message.startswith("glue/mnli train: could not download")
    assert url in message and f"place {source / 'MNLI' / 'train.tsv'} instead" in message
    assert "gluebenchmark.com" in message

    from tensorflow_datasets.core.download import downloader

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network although BERT_MINI_OFFLINE is set")

    monkeypatch.setattr(downloads, "_probe", no_network)
    monkeypatch.setattr(downloader, "_open_url", no_network)
    monkeypatch.setenv("BERT_MINI_OFFLINE", "1")
    with pytest.raises(DataError, match=r"BERT_MINI_OFFLINE is set.*QQP/dev\.tsv instead"):
        load_glue("tfds:glue/qqp", "validation", source_dir=source, tfds_dir=tfds_dir)


def test_glue_fallback_when_the_tfds_download_itself_fails(tmp_path, monkeypatch):
    import requests
    from tensorflow_datasets.core.download import downloader

    from bert_mini.data.glue import load_glue
    from bert_mini.data.sources import DataError

    def dns_failure(url, **kwargs):
        raise requests.exceptions.ConnectionError(f"Failed to resolve host of {url}")

    monkeypatch.setattr(downloads, "_probe", lambda url: None)  # pretend the host answered
    monkeypatch.setattr(downloader, "_open_url", dns_failure)
    source = tmp_path / "glue"
    (source / "MNLI").mkdir(parents=True)  # the folder exists, the split's file does not
    with pytest.raises(DataError, match=r"Failed to resolve.*MNLI/dev_matched\.tsv instead"):
        load_glue("mnli", "validation_matched", source_dir=source, tfds_dir=tmp_path / "tfds")


def test_glue_fallback_reads_the_catalog_builder_with_local_feature_names(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    from bert_mini.data.glue import BertMiniGlue, load_glue

    extracted = tmp_path / "extracted"
    rows = ["premise one\thypothesis one\tneutral", "premise two\thypothesis two\tcontradiction"]
    for name in ("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"):
        label = "" if name.startswith("test") else "\tgold_label"
        body = [r if label else r.rpartition("\t")[0] for r in rows]
        text = "\n".join([f"sentence1\tsentence2{label}", *body]) + "\n"
        (extracted / "MNLI").mkdir(parents=True, exist_ok=True)
        (extracted / "MNLI" / f"{name}.tsv").write_text(text, encoding="utf-8")
    fetched = []

    def fake_download(self, url):
        fetched.append(url)
        return str(extracted)

    monkeypatch.setattr(downloads, "_probe", lambda url: None)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fake_download)
    tfds_dir = tmp_path / "tfds"
    ds = load_glue("mnli", "train", source_dir=tmp_path / "glue", tfds_dir=tfds_dir)
    got = list(ds.as_numpy_iterator())
    assert fetched == [_glue_config("mnli").data_url]
    local = BertMiniGlue(data_dir=str(tmp_path / "local"), config="mnli").info.features
    assert set(got[0]) == set(local) == {"premise", "hypothesis", "label", "idx"}
    labels = local["label"].names
    assert sorted((r["premise"].decode(), labels[r["label"]]) for r in got) == [
        ("premise one", "neutral"),
        ("premise two", "contradiction"),
    ]
    ds = load_glue("mnli", "test_matched", source_dir=tmp_path / "glue", tfds_dir=tfds_dir)
    test = list(ds.as_numpy_iterator())
    assert [int(r["label"]) for r in test] == [-1, -1] and len(fetched) == 1  # prepared once
